"""AdamW step time by implementation: PyTorch's for-loop, foreach and fused steps (the `adamw_fused` lever).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optimizer_step.py [--steps 20] [--device cpu] [--record]

Two parameter sets, gradients random: "lora" (400 rank-16 matrices of a 640-wide model, as a LoRA on 200
layers) and "full" (40 matrices of 640x640 and 80 vectors). Each optimiser takes 3 untimed steps, then
`--steps` timed ones; the table gives milliseconds per step and the fused step's speed-up over the default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SETS = {"lora": [(16, 640), (640, 16)] * 200, "full": [(640, 640)] * 40 + [(640,)] * 80}
KINDS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(shapes: list[tuple[int, ...]], options: dict, steps: int, device: str) -> float:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
    for _ in range(3):
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    rows = {name: {kind: step_ms(shapes, options, args.steps, args.device) for kind, options in KINDS.items()}
            for name, shapes in SETS.items()}
    lines = ["| parameters | for-loop (ms) | foreach (ms) | fused (ms) | fused speed-up over the default |",
             "|---|---|---|---|---|"]
    default = "foreach" if args.device == "cuda" else "for-loop"  # PyTorch's choice without fused
    for name, row in rows.items():
        lines.append(f"| {name} | {row['for-loop']:.1f} | {row['foreach']:.1f} | {row['fused']:.1f} | "
                     f"{row[default] / row['fused']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        machine = (torch.cuda.get_device_name() if args.device == "cuda" else
                   f"{platform.machine()}, {torch.get_num_threads()} torch threads")
        command = "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optimizer_step.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as handle:
            handle.write(f"\n## AdamW step by implementation ({dt.date.today()})\n\nMachine: {machine}; torch "
                         f"{torch.__version__}. Command: `{command.strip()}`. {args.steps} timed steps after 3.\n\n"
                         f"{table}\n")
    return rows


if __name__ == "__main__":
    main()
