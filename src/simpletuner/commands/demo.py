"""`simpletuner demo`: train a tiny LoRA on generated images, on CPU, in a few minutes.

Draws a small procedural dataset (coloured shapes with captions), builds a tiny
SDXL-architecture model locally, caches latents and text embeddings, trains a
LoRA with validation images and TensorBoard logs, draws the loss curve
(output/loss.png), and prints where everything is. A re-run into the same folder
starts afresh: the previous run's output/ is removed; dataset, model and caches are reused.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-output", help="folder for the dataset, model, caches and results; "
                        "a re-run into it starts afresh (its output/ is removed)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simpletuner.config.load import load_settings
    from simpletuner.demo.lossplot import write_loss_plot
    from simpletuner.demo.run import write_demo
    from simpletuner.errors import UserError
    from simpletuner.publish.notify import build_events
    from simpletuner.train.trainer import train

    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: give at least 1")
    root = Path(args.output).resolve()
    print(f"demo: writing a procedural dataset and a tiny SDXL model under {root}", flush=True)
    config = write_demo(root, steps=args.steps)
    settings = load_settings(config)
    result = train(settings, build_events(settings))  # as `simpletuner train`: model card and run page too
    output = result.output_dir
    ui_files = [str(path) for path in result.outputs if path.name != "pytorch_lora_weights.safetensors"]
    plot = write_loss_plot(output / "metrics.jsonl", output / "loss.png", title=f"demo loss, {result.steps} steps")
    print(f"""
demo finished: {result.steps} steps.
  LoRA:              {output / 'pytorch_lora_weights.safetensors'}
  LoRA for ComfyUI, A1111/Forge: {', '.join(ui_files) or '(not written)'}
  run page:          {output / 'report.html'}  (open it in a browser)
  model card:        {output / 'README.md'}
  loss curve:        {plot or '(no finite loss was logged)'}
  validation images: {output / 'validation'} (step-0 is the base model)
  checkpoints:       {output / 'checkpoints'}
  TensorBoard logs:  {output / 'logs'}  (tensorboard --logdir {output / 'logs'})
  configuration:     {config}

The validation images look like noise, at every step: the base model is a tiny SDXL with random weights,
built here so the demo needs no download, and it never learned to draw. The demo shows the machinery
(caching, training, checkpoints, validation, export); the loss curve shows the LoRA learning. With a
real base model the same configuration gives real images.

Load the LoRA in diffusers:
  from diffusers import StableDiffusionXLPipeline
  pipe = StableDiffusionXLPipeline.from_pretrained("{root / 'model'}")
  pipe.load_lora_weights("{output}", weight_name="pytorch_lora_weights.safetensors")
  pipe("a red circle on a blue background", height=64, width=64).images[0].save("shape.png")
""")
    return 0
