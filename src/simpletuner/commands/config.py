"""`simpletuner config check FILE [--key value ...]`: validate a configuration and its datasets."""

from __future__ import annotations

import argparse
import sys

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        usage="simpletuner config check FILE [--key value ...]",
        help="validate a configuration and its dataset file, and print a summary",
        description="Validate a configuration (TOML, JSON, SimpleTuner config.json or config.env) and its "
        "datasets: options, dataset references, local paths. Options given after FILE as --key value "
        "override the file. No network is used: Hub model ids are accepted as written.",
    )
    check.add_argument("file", metavar="FILE", help="configuration file")


def run(args: argparse.Namespace) -> int:
    from simpletuner.config.check import check_settings
    from simpletuner.config.load import load_settings, problem_list
    from simpletuner.errors import ConfigError

    settings = load_settings(args.file, getattr(args, "overrides", []) or [])
    report = check_settings(settings)
    print("\n".join(report.summary))
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        raise ConfigError(problem_list(report.problems, args.file))
    print("configuration OK", file=sys.stderr)
    return 0
