"""Caching throughput: our cache jobs against a plain loop over the same encoder.

    python benchmarks/cache_encode.py [--size 256] [--images 32] [--batch 4] [--record]

VAE rows: the SDXL and Flux VAEs built from their published configurations (diffusers'
AutoencoderKL, random weights, fp32 on CPU), encoding `--images` PNGs of `--size` px.
Ours is `simpletuner.cache.latents.cache_latents` (loader threads, batches by size, a real
tensor store on disk); the reference is a loop that opens each image, converts it to
[-1, 1] pixels, stacks `--batch` of them and calls `vae.encode(...).latent_dist`.

Text rows: each family's text stack as `text_outputs` runs it, through
`simpletuner.cache.text.cache_texts` against a plain loop over the same function, batch
`--batch`. The stacks are the tiny test stacks of simpletuner.testing.tiny (full-size T5-XXL
does not fit this machine's memory): the ratio measures the cache job's overhead, not an
encoder's speed.

The ratio ours/reference is what the rows record; a CPU ratio is no GPU figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# published configurations (stabilityai/stable-diffusion-xl-base-1.0 vae, black-forest-labs/FLUX.1-dev vae)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
FLUX_VAE = dict(SDXL_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)


def _images(folder: Path, count: int, size: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        pixels = torch.randint(0, 255, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(pixels).save(paths[-1], compress_level=1)
    return paths


def _timed(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def vae_row(name: str, config: dict[str, Any], paths: list[Path], root: Path, batch: int) -> tuple[str, float, float]:
    """(row name, ours images/s, reference images/s)."""
    from diffusers import AutoencoderKL

    from simpletuner.cache.keys import EncoderIdentity
    from simpletuner.cache.latents import cache_latents, latent_entry, latent_items, load_pixels
    from simpletuner.cache.store import TensorStore
    from simpletuner.data.records import ImagePlan, ImageRecord

    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval()
    size = _side(paths[0])
    plan = ImagePlan((size, size), (size, size), (0, 0, size, size), (size, size))
    records = [ImageRecord(p.name, p.stat().st_size, p.stat().st_mtime, size, size) for p in paths]
    items = latent_items(str(paths[0].parent), records, [plan] * len(records),
                         EncoderIdentity(f"random-{name}", "vae", "float32"))

    def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return latent_entry(vae.encode(pixels).latent_dist)

    def reference() -> None:
        for start in range(0, len(paths), batch):
            pixels = torch.stack([load_pixels(str(p), plan) for p in paths[start:start + batch]])
            with torch.no_grad():
                vae.encode(pixels).latent_dist.mean.clone()

    encode(torch.zeros(1, 3, size, size))  # warm-up
    store = TensorStore(str(root / f"store-{name}"))
    ours = _timed(lambda: cache_latents(items, store, encode, batch_size=batch, progress=False))
    store.close()
    return f"{name} VAE, {size} px", len(paths) / ours, len(paths) / _timed(reference)


def _side(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.width


def text_row(family_name: str, root: Path, prompts: list[str], batch: int) -> tuple[str, float, float]:
    """(row name, ours prompts/s, reference prompts/s) for a family's (tiny) text stack."""
    from simpletuner.cache.keys import EncoderIdentity
    from simpletuner.cache.store import TensorStore
    from simpletuner.cache.text import cache_texts
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.registry import get_family
    from simpletuner.testing.tiny import build

    model = build(family_name, root / f"model-{family_name}")
    family = get_family(family_name)
    cfg = TrainingConfig(model_family=family_name, pretrained_model_name_or_path=str(model),
                         output_dir=str(root / "out"), base_model_default_dtype="fp32", mixed_precision="no")
    components = family.load(cfg)

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: tensor.cpu() for name, tensor in family.text_outputs(components, captions).items()}

    def reference() -> None:
        for start in range(0, len(prompts), batch):
            encode(prompts[start:start + batch])

    encode(prompts[:1])  # warm-up
    store = TensorStore(str(root / f"text-{family_name}"))
    ours = _timed(lambda: cache_texts(prompts, store, encode, EncoderIdentity(f"tiny-{family_name}", "text", "float32"),
                                      batch_size=batch, include_empty=False, progress=False))
    store.close()
    return f"{family_name} text stack (tiny)", len(prompts) / ours, len(prompts) / _timed(reference)


def table(rows: list[tuple[str, float, float]], unit: str) -> str:
    lines = [f"| encoder | ours ({unit}/s) | plain loop ({unit}/s) | ours / plain |", "|---|---|---|---|"]
    lines += [f"| {name} | {ours:.2f} | {plain:.2f} | {ours / plain:.2f} |" for name, ours, plain in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (1024 on a GPU)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--families", default="sdxl,flux", help="text stacks to measure")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = _images(root / "images", args.images, args.size)
        vae = [vae_row(name, config, paths, root, args.batch) for name, config in (("SDXL", SDXL_VAE),
                                                                                   ("Flux", FLUX_VAE))]
        prompts = [f"a photo of object {i} in colour {i % 17}, seen from angle {i % 5}" for i in range(args.prompts)]
        text = [text_row(name, root, prompts, args.batch) for name in args.families.split(",") if name]
    report = table(vae, "images") + "\n\n" + table(text, "prompts")
    print(report)
    if args.record:
        command = "python benchmarks/cache_encode.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with RESULTS.open("a", encoding="utf-8") as handle:
            handle.write(f"\n## Caching throughput on CPU ({dt.date.today().isoformat()})\n\n"
                         f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                         f"{torch.get_num_threads()}. Command: `{command.strip()}`. {args.images} images of "
                         f"{args.size} px, {args.prompts} prompts, batch {args.batch}.\n\n{report}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
