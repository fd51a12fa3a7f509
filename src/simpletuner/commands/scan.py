"""`simpletuner scan CONFIG [--key value ...]`: index the datasets and show how they bucket.

The scan itself is `simpletuner.data.scan` (training starts from it too); this command prints it. A
dataset with no usable image stops with the reason for every excluded group (exit 2).
"""

from __future__ import annotations

import argparse
import sys

ACCEPTS_OVERRIDES = True  # --key value after the config override it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="configuration file (TOML, JSON, config.json or config.env); options "
                        "given after it as --key value override the file")


def run(args: argparse.Namespace) -> int:
    from simpletuner.config.load import load_settings
    from simpletuner.data.scan import scan_settings
    from simpletuner.models.registry import get_family, with_checkpoint

    settings = with_checkpoint(load_settings(args.config, getattr(args, "overrides", None) or []))
    if any(dataset.conditioning for dataset in settings.datasets):  # conditioning: [{type: canny}]
        from simpletuner.data.generators import generate_all, with_generated_conditioning

        original, settings = settings, with_generated_conditioning(settings)
        print("\n".join(generate_all(settings, original)))
    scan_settings(settings, sys.stdout, get_family(settings.training.model_family))
    return 0
