"""`simpletuner train CONFIG [--key value ...]`: scan, cache, then train.

Bad input (configuration, datasets, model folder, output directory, a checkpoint
of another configuration) stops with a clear message and exit code 2 before the
long work starts. For several processes, launch through accelerate:
`accelerate launch --num_processes N -m simpletuner train CONFIG`.
"""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="configuration file (TOML, JSON, config.json or config.env); options "
                        "given after it as --key value override the file")


def run(args: argparse.Namespace) -> int:
    from simpletuner.config.load import load_settings
    from simpletuner.models.registry import with_checkpoint
    from simpletuner.publish.notify import build_events
    from simpletuner.train.trainer import train

    settings = with_checkpoint(load_settings(args.config, getattr(args, "overrides", None) or []))
    result = train(settings, build_events(settings))
    print(f"trained {result.steps} steps; outputs: {', '.join(str(p) for p in result.outputs)}")
    return 0
