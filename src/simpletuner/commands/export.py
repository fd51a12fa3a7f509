"""`simpletuner export SOURCE --output DIR [--format FORMAT]`: a run's LoRA in another form.

SOURCE is a training output_dir (its final LoRA) or one of its checkpoints
(`output_dir/checkpoints/step-N`). Formats: `diffusers` (pytorch_lora_weights.safetensors for the
pipeline's load_lora_weights; PixArt, Hunyuan-DiT: peft's adapter folder), `comfyui` (<run name>.safetensors
for ComfyUI, A1111 and Forge; for a DoRA LoRA the base model is loaded, as its dora_scale needs the
base weights) and `merged` (the base pipeline with the LoRA fused into its weights, saved with
save_pretrained into DIR, which must be new or empty; the base model must be where the run's
configuration says). Files are written under a temporary name and renamed when complete. A folder
that is not an output or checkpoint of a LoRA run, or a format the model family cannot have, stops
with a message (exit 2).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a training output_dir, or one of its checkpoints/step-N folders")
    parser.add_argument("--output", "-o", required=True, help="folder to write into (created if needed)")
    parser.add_argument("--format", "-f", default="diffusers",
                        help="diffusers (default): the LoRA file the family's pipeline loads; comfyui: "
                        "<run name>.safetensors for ComfyUI, A1111 and Forge (docs/UI_LORA.md); merged: a full "
                        "pipeline folder with the LoRA fused in")


def run(args: argparse.Namespace) -> int:
    from simpletuner.publish.convert import export, find_export_source

    source = find_export_source(args.source)
    written = export(source, args.format, args.output)
    print(f"exported step {source.step} of {source.config.model_family} ({source.kind}) as {args.format}: "
          f"{', '.join(str(path) for path in written)}")
    return 0
