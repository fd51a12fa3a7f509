"""`simpletuner demo`: train a tiny LoRA on generated images, on CPU, in a few minutes.

Draws a small procedural dataset (coloured shapes with captions), builds a tiny
SDXL-architecture model locally, caches latents and text embeddings, trains a
LoRA with validation images and TensorBoard logs, and prints where everything is.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-output", help="folder for the dataset, model, caches and results")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simpletuner.config.load import load_settings
    from simpletuner.demo.run import write_demo
    from simpletuner.errors import UserError
    from simpletuner.train.trainer import train

    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: give at least 1")
    root = Path(args.output).resolve()
    print(f"demo: writing a procedural dataset and a tiny SDXL model under {root}", flush=True)
    config = write_demo(root, steps=args.steps)
    result = train(load_settings(config))
    output = result.output_dir
    print(f"""
demo finished: {result.steps} steps.
  LoRA:              {output / 'pytorch_lora_weights.safetensors'}
  validation images: {output / 'validation'} (step-0 is the base model)
  checkpoints:       {output / 'checkpoints'}
  TensorBoard logs:  {output / 'logs'}  (tensorboard --logdir {output / 'logs'})
  configuration:     {config}

Load the LoRA in diffusers:
  from diffusers import StableDiffusionXLPipeline
  pipe = StableDiffusionXLPipeline.from_pretrained("{root / 'model'}")
  pipe.load_lora_weights("{output}", weight_name="pytorch_lora_weights.safetensors")
  pipe("a red circle on a blue background", height=64, width=64).images[0].save("shape.png")
""")
    return 0
