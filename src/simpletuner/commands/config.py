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
    from simpletuner.config.check import check_file
    from simpletuner.config.load import problem_list
    from simpletuner.errors import ConfigError
    from simpletuner.log import get_logger
    from simpletuner.models.registry import flavour_problem, resolve_checkpoint
    from simpletuner.publish.notify import publishing_problems

    report, loaded = check_file(args.file, getattr(args, "overrides", []) or [])
    for warning in loaded.warnings:
        get_logger(__name__).warning(warning)
    if loaded.training is not None:
        report.problems += publishing_problems(loaded.training)
    if problem := flavour_problem(loaded.partial_training()):
        report.problems.append(problem)
    elif loaded.training is not None and not loaded.training.pretrained_model_name_or_path:
        checkpoint = resolve_checkpoint(loaded.training).pretrained_model_name_or_path
        report.summary = [f"base model: {checkpoint} (model_flavour {loaded.training.model_flavour or 'default'})"
                          if line.startswith("base model: ") else line for line in report.summary]
    print("\n".join(report.summary))
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        raise ConfigError(problem_list(report.problems, args.file))
    print("configuration OK", file=sys.stderr)
    return 0
