"""`--key value`, `--key=value` and `--flag` arguments (command line, TRAINER_EXTRA_ARGS)."""

from __future__ import annotations

from collections.abc import Sequence

from simpletuner.errors import ConfigError


def _is_option(token: str) -> bool:
    return token.startswith("--") and len(token) > 2


def parse_arguments(tokens: Sequence[str], origin: str = "command line") -> dict[str, str | bool]:
    """Turn argument tokens into {option: value}. A bare `--flag` means true; later ones win.

    Dashes inside names become underscores (`--learning-rate` is `learning_rate`). Values stay
    strings: the schema converts them.
    """
    values: dict[str, str | bool] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not _is_option(token):
            raise ConfigError(
                f"{origin}: unexpected argument {token!r}; options are given as --key value, --key=value or --flag"
            )
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not name:
            raise ConfigError(f"{origin}: {token!r} has no option name")
        if has_value:
            values[name] = value
            index += 1
        elif index + 1 < len(tokens) and not _is_option(tokens[index + 1]):
            values[name] = tokens[index + 1]
            index += 2
        else:
            values[name] = True
            index += 1
    return values
