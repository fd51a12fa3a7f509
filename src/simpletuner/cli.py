"""The `simpletuner` command line.

Each subcommand lives in `simpletuner.commands.<name>` with two functions:
`add_arguments(parser)` and `run(args) -> int`. Those modules import only the
standard library at top level, so `--help` and `config check` stay fast; heavy
work is imported inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from simpletuner.errors import UserError
from simpletuner.log import setup_logging

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("simpletuner.commands.train", "train a model from a configuration"),
    "scan": ("simpletuner.commands.scan", "index the datasets and show how they bucket"),
    "cache": ("simpletuner.commands.cache", "pre-compute VAE latents and text embeddings (verify, prune)"),
    "demo": ("simpletuner.commands.demo", "train a tiny LoRA on generated images, on CPU, in minutes"),
    "config": ("simpletuner.commands.config", "check a configuration and its dataset file"),
    "options": ("simpletuner.commands.options", "list every option with type, default and help"),
    "export": ("simpletuner.commands.export", "turn a LoRA output or checkpoint into a LoRA file or a merged pipeline"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simpletuner",
        description="Fine-tune text-to-image diffusion models.",
    )
    from simpletuner import __version__

    parser.add_argument("--version", action="version", version=f"simpletuner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    before_command = argv[: argv.index(args.command)] if args.command in argv else argv
    if unknown := [token for token in extra if token in before_command]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (options of a command come after its name)")
    if args.command is None:
        parser.print_help()
        return 0
    accepts_extra = getattr(args._module, "ACCEPTS_OVERRIDES", False)
    if extra and not accepts_extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args._module.run(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
