"""`simpletuner train` (not built yet)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="configuration file (TOML, JSON, config.env)")


def run(args: argparse.Namespace) -> int:
    print("simpletuner train is not available yet in this version.")
    return 1
