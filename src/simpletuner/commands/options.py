"""`simpletuner options`: every option with its type, default, accepted values and help.

`python -m simpletuner.commands.options --write-docs` regenerates docs/OPTIONS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def docs_path() -> Path:
    """docs/OPTIONS.md of the source checkout (src/simpletuner/commands/options.py -> repo root)."""
    return Path(__file__).resolve().parents[3] / "docs" / "OPTIONS.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("filter", nargs="?", default="", help="show only options whose name or help contains this")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="print docs/OPTIONS.md (Markdown) instead")
    form.add_argument("--write-docs", nargs="?", const=str(docs_path()), metavar="PATH", default=None,
                      help=f"write the Markdown to PATH (default: {docs_path()})")


def run(args: argparse.Namespace) -> int:
    from simpletuner.config.describe import render_markdown, render_text

    if args.write_docs:
        path = Path(args.write_docs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
        return 0
    text = render_markdown() if args.markdown else render_text(args.filter)
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simpletuner.commands.options", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
