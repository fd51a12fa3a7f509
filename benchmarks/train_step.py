"""Training-step throughput, memory and model FLOPs utilisation: our step against diffusers' example loop.

    python benchmarks/train_step.py --model sdxl --mode lora --batch 4 --resolution 1024 --record

Builds the denoiser at its published size with random weights (benchmarks/architectures.py), feeds it
batches shaped as the latent and text caches give them, and times `--steps` optimiser steps after
`--warmup` steps, for the trainer's own step (benchmarks/trainer_step.py: the function `simpletuner train`
calls per update, over the trainer's model, optimiser, sharding and batch feed; its levers are options of
`simpletuner train`, changed with `--set key=value`) and then, in the same process, for the plain diffusers
training step (benchmarks/steps.py). Under `torchrun --nproc_per_node N` our step runs on N processes
(the reference is skipped) and rank 0 reports. Reports seconds/step, samples/s, peak memory, achieved TFLOP/s and MFU
(analytic FLOPs; formula in benchmarks/flops.py), and the ratio of samples/s (ours / reference).
`--record` appends the table to benchmarks/RESULTS.md with date, device, versions and the command.
`--tiny --device cpu` runs the same code on tiny configurations: a check of the harness, not a figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class StepResult:
    name: str
    seconds_per_step: float | None = None
    samples_per_second: float | None = None
    peak_memory_gib: float | None = None  # CUDA only: torch.cuda.max_memory_allocated
    achieved_tflops: float | None = None
    mfu: float | None = None
    trainable_parameters: int = 0
    last_loss: float | None = None
    host_syncs_per_step: float | None = None  # CUDA only, counted on extra untimed steps
    error: str | None = None  # "out of memory", or the failure's message
    levers: list[str] = field(default_factory=list)  # the speed levers the step ran with ("-x": off)


@dataclass
class BenchmarkReport:
    command: str
    model: str
    mode: str
    batch: int
    resolution: int
    tiny: bool
    device: str
    levers: list[str]
    options: dict[str, Any]
    processes: int
    gradient_checkpointing: bool
    forward_tflop_per_sample: float
    step_tflop: float
    peak_tflops: float | None
    date: str
    versions: dict[str, str]
    ours: StepResult
    reference: StepResult | None = None
    ratio: float | None = None  # samples/s, ours / reference
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.architectures import ARCHITECTURES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(ARCHITECTURES))
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="pixels per side (default: the model's native; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, autotuning, compile)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="tiny configurations: checks the harness, measures nothing real")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of `simpletuner train` for our step (repeatable), e.g. torch_compile=false, "
                   "attention_backend=flash, fuse_qkv_projections=true; values are read as JSON, else as text")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both steps (+1 forward in the FLOPs)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers reference step")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: 989.4, the bf16 dense datasheet figure, on H100/H200)")
    p.add_argument("--record", action="store_true", help="append the result to RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS, help="where --record appends (default: %(default)s)")
    return p.parse_args(argv)


def parse_options(items: list[str]) -> dict[str, Any]:
    """`--set key=value` items -> options of `simpletuner train` (values read as JSON, else kept as text)."""
    from simpletuner.errors import UserError

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set torch_compile=false")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def measure(build, work, *, warmup: int, steps: int, step_flops: float, peak_tflops: float | None,
            name: str) -> StepResult:
    """Build a step, run `warmup` steps, then time `steps` steps between two device synchronisations.

    Peak memory covers everything from the build on (weights, optimiser state, activations).
    """
    import torch
    from tqdm import tqdm

    from benchmarks.flops import mfu

    device = work.device
    _free(device)
    result = StepResult(name)
    prepared = None
    try:
        prepared = build(work)
        result.name = prepared.name
        result.levers = list(prepared.levers or [])
        result.trainable_parameters = prepared.trainable_parameters
        with tqdm(total=warmup + steps, desc=prepared.name, unit="step", leave=False, file=sys.stderr) as bar:
            for _ in range(warmup):
                prepared.run_step()
                bar.update()
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                prepared.run_step()
                bar.update()
            result.last_loss = prepared.last_loss()  # reads back from the device: the step has finished
            _sync(device)
            elapsed = time.perf_counter() - start
        if device.type == "cuda":
            result.host_syncs_per_step = count_host_syncs(prepared.run_step, steps=2)
    except torch.OutOfMemoryError:
        result.error = "out of memory"
        return result
    finally:
        if prepared is not None:
            prepared.close()
        del prepared
        if device.type == "cuda":
            result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        _free(device)
    result.seconds_per_step = elapsed / steps
    result.samples_per_second = work.batch / result.seconds_per_step
    result.achieved_tflops = step_flops / result.seconds_per_step / 1e12
    result.mfu = mfu(step_flops, result.seconds_per_step, peak_tflops)
    return result


def count_host_syncs(run_step, *, steps: int) -> float:
    """Host synchronisations per step, as torch.cuda's sync debug mode reports them (untimed steps)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                run_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                "peft": peft.__version__}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace, command: str) -> BenchmarkReport:
    import torch

    from benchmarks.architectures import check_resolution, get_architecture
    from benchmarks.flops import forward_flops, peak_tflops_for, training_factor
    from benchmarks.steps import Workload, build_reference_step
    from benchmarks.trainer_step import build_trainer_step
    from simpletuner.errors import UserError

    arch = get_architecture(args.model)
    resolution = args.resolution or (64 if args.tiny else arch.default_resolution)
    check_resolution(arch, resolution)
    for name in ("batch", "steps", "lora_rank"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: must be 0 or more")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu (with --tiny)")
    options = parse_options(args.options)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    work = Workload(arch, args.mode, args.batch, resolution, args.tiny, device,
                    args.gradient_checkpointing, args.lora_rank)
    forward = forward_flops(arch, batch=1, resolution=resolution, tiny=args.tiny)
    step_flops = forward * args.batch * training_factor(args.mode, args.gradient_checkpointing)
    device_name = _device_name(device)
    peak = args.peak_tflops or (peak_tflops_for(device_name) if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (optimizer, loss) as any trainer sets
        torch.backends.cudnn.allow_tf32 = True
    measured = dict(warmup=args.warmup, steps=args.steps, step_flops=step_flops, peak_tflops=peak)
    ours = measure(lambda w: build_trainer_step(w, options), work, name="simpletuner", **measured)
    reference = None
    if not args.no_reference and processes == 1:
        reference = measure(build_reference_step, work, name="diffusers example", **measured)
    if processes > 1 and ours.samples_per_second:  # every process trains its own batch
        ours.samples_per_second *= processes
    ratio = None
    if reference and ours.samples_per_second and reference.samples_per_second:
        ratio = ours.samples_per_second / reference.samples_per_second
    notes: list[str] = []
    return BenchmarkReport(
        command=command, model=arch.name, mode=args.mode, batch=args.batch, resolution=resolution, tiny=args.tiny,
        device=device_name, levers=ours.levers, options=options, processes=processes,
        gradient_checkpointing=args.gradient_checkpointing,
        forward_tflop_per_sample=forward / 1e12, step_tflop=step_flops / 1e12, peak_tflops=peak,
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), versions=_versions(),
        ours=ours, reference=reference, ratio=ratio, notes=notes,
    )


# --- output ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def table(report: BenchmarkReport) -> str:
    """The result as a Markdown table (printed and recorded alike)."""
    rows = ["| step | s/step | samples/s | peak memory (GiB) | TFLOP/s | MFU | host syncs/step | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for result in filter(None, (report.ours, report.reference)):
        if result.error:
            rows.append(f"| {result.name} | {result.error} | | {_fmt(result.peak_memory_gib, '.1f')} | | | | |")
            continue
        mfu = "n/a" if result.mfu is None else f"{100 * result.mfu:.1f}%"
        rows.append(
            f"| {result.name} | {_fmt(result.seconds_per_step, '.4f')} | {_fmt(result.samples_per_second, '.2f')} | "
            f"{_fmt(result.peak_memory_gib, '.1f')} | {_fmt(result.achieved_tflops, '.3g')} | {mfu} | "
            f"{_fmt(result.host_syncs_per_step, 'g')} | "
            f"{result.trainable_parameters:,} |"
        )
    if report.ratio is not None:
        rows.append(f"\nours / reference, samples/s: **{report.ratio:.2f}x**")
    return "\n".join(rows)


def _flop(tflop: float) -> str:
    return f"{tflop:.3f} TFLOP" if tflop >= 0.1 else f"{tflop * 1e3:.3f} GFLOP"


def describe(report: BenchmarkReport) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    peak = "n/a (no peak known for this device)" if report.peak_tflops is None else f"{report.peak_tflops:g} TFLOP/s"
    size = " (tiny configuration: a regression check of ours against the reference, no GPU claim)" if report.tiny else ""
    lines = [
        f"## Training step: {report.model} {report.mode}, {report.resolution}px, batch {report.batch}{size}",
        "",
        f"- date: {report.date}; device: {report.device}",
        f"- software: {versions}",
        f"- command: `{report.command}`",
        f"- our step: `simpletuner train`'s, with options {json.dumps(report.options) if report.options else '(defaults)'}; "
        f"levers: {', '.join(report.levers) or 'none'}; processes: {report.processes}"
        + (" (samples/s counts every process)" if report.processes > 1 else ""),
        f"- analytic FLOPs: forward {_flop(report.forward_tflop_per_sample)}/sample, step {_flop(report.step_tflop)}; "
        f"MFU against peak {peak}",
        *(f"- note: {note}" for note in report.notes),
        "",
        table(report),
    ]
    return "\n".join(lines) + "\n"


def record(report: BenchmarkReport, path: Path) -> None:
    """Append the report to `path` (created with a title if missing); never rewrites what is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    with path.open("a", encoding="utf-8") as handle:
        if fresh:
            handle.write("# Benchmark results\n")
        handle.write("\n" + describe(report))


def main(argv: list[str] | None = None) -> BenchmarkReport:
    """Run the benchmark and print its table; returns the report (the test suite reads it)."""
    from simpletuner.log import setup_logging

    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --standalone --nproc_per_node {world} " if world > 1 else "python "
    command = launcher + "benchmarks/train_step.py " + shlex.join(argv)
    report = run(args, command)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return report
    print(describe(report))
    if args.record:
        record(report, args.results)
        print(f"recorded in {args.results}")
    return report


def cli(argv: list[str] | None = None) -> int:
    from simpletuner.errors import UserError

    try:
        report = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [r for r in (report.ours, report.reference) if r is not None and r.error]
    return 1 if failed else 0


def as_dict(report: BenchmarkReport) -> dict:
    return asdict(report)


if __name__ == "__main__":
    raise SystemExit(cli())
