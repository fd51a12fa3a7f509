"""Reading configuration files (TOML, JSON, SimpleTuner's config.json and config.env) into raw options.

Nothing here knows the schema: a file becomes `{option: value}` plus where each option
came from, so later errors can name the file (and the line, for config.env).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from difflib import get_close_matches
from itertools import compress, repeat
from pathlib import Path
from typing import Any

import orjson

from simpletuner.config.arguments import parse_arguments
from simpletuner.config.compat import ENV_ARGUMENT_LISTS, ENV_LAUNCHER, ENV_NAMES
from simpletuner.errors import ConfigError


@dataclass
class RawConfig:
    """Options as written, before validation."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # option -> "file", "file:line" or "command line"
    datasets: list[Any] | None = None  # [[datasets]] tables of a TOML file
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    left_out: int = 0  # unknown options a large file held beyond those kept in `values` (counted, not read)

    def update(self, values: dict[str, Any], origin: str) -> None:
        sources = dict.fromkeys(values, origin)
        if self.values or self.sources:
            self.values.update(values)
            self.sources.update(sources)
        else:  # the first layer: no copies (a file may hold millions of keys)
            self.values, self.sources = values, sources


def config_format(path: Path) -> str:
    """'toml', 'json' or 'env', from the file name (or its first character when that says nothing)."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix == ".json":
        return "json"
    if suffix == ".env" or path.name.endswith(".env") or path.name.startswith(".env"):
        return "env"
    head = _read_text(path).lstrip()[:1]
    return "json" if head == "{" else "toml" if head == "[" else "env"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _reading_error(path, error) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise _reading_error(path, error) from None


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _reading_error(path, error) from None


def _reading_error(path: Path, error: OSError | UnicodeDecodeError) -> ConfigError:
    if isinstance(error, FileNotFoundError):
        return ConfigError(f"configuration file not found: {path}")
    if isinstance(error, IsADirectoryError):
        return ConfigError(f"{path} is a folder; give the configuration file (config.toml, config.json, config.env)")
    return ConfigError(f"cannot read configuration file {path}: {error}")


def read_config_file(path: str | Path, recognised: Collection[str] | None = None, unknown: int = 0) -> RawConfig:
    """Read one configuration file of any supported form. With `recognised` (every name a later step looks at),
    a JSON file of MANY_KEYS_BYTES or more keeps only those options and the first `unknown` others, and counts
    the rest in `left_out` (see many_keys.py; it reads the whole file when that could differ)."""
    path = Path(path).expanduser()
    kind = config_format(path)
    if kind == "json":
        raw = _read_json(path, recognised, unknown)
    else:
        raw = {"toml": _read_toml, "env": _read_env}[kind](path)
    raw.path = path
    return raw


def _without_dashes(data: dict[str, Any], text: str) -> dict[str, Any]:
    """SimpleTuner's config.json writes keys as `--name`; both forms mean `name` (keys of JSON and TOML are text).
    `text` is the file's: without "--" or an escape in it, no key can start with "--" (and none is looked at)."""
    if "--" not in text and "\\u" not in text or not any(map(str.startswith, data, repeat("--"))):
        return data
    return {key[2:] if key[:2] == "--" else key: value for key, value in data.items()}


MAX_DEPTH = 32  # nesting levels a configuration or dataset file may have (real ones use 3 or 4)


def _walk(data: Any, path: Path) -> bool:
    """A ConfigError when `data` nests deeper than MAX_DEPTH (checked without recursion); else whether it holds a
    float that may be a whole number beyond 64 bits read by orjson. Each container's items are filtered in C by
    their types: a file may hold millions of them."""
    stack = [(data, 1)]
    large_float = False
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: values nest more than {MAX_DEPTH} levels deep; a configuration holds "
                              "options, lists and small tables")
        if type(value) is not dict and type(value) is not list:
            continue
        children = list(value.values()) if type(value) is dict else value
        kinds = set(map(type, children))
        if dict in kinds or list in kinds:
            stack.extend(zip(compress(children, map(isinstance, children, repeat((dict, list)))), repeat(depth + 1)))
        if float in kinds and not large_float:
            floats = compress(children, map(isinstance, children, repeat(float)))
            large_float = any(abs(number) >= 2**63 and number.is_integer() for number in floats)
    return large_float


def _check_depth(data: Any, path: Path) -> Any:
    """`data`, or a ConfigError when it nests deeper than MAX_DEPTH."""
    _walk(data, path)
    return data


def _too_deep(path: Path) -> ConfigError:
    return ConfigError(f"{path}: values nest too deeply to read (more than {MAX_DEPTH} levels are refused); "
                       "a configuration holds options, lists and small tables")


def _number_text(error: ValueError) -> str:
    if "digits" in str(error):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return str(error)


def _loads(text: str, path: Path) -> Any:
    """orjson where it reads the file as the standard library does (several times faster on large files);
    json itself where orjson refuses (Infinity, NaN, a trailing comma, a lone surrogate, deep nesting: json
    accepts or reports them as before) or may have read a whole number beyond 64 bits as a float."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _check_depth(json.loads(text), path)
    return _check_depth(json.loads(text), path) if _walk(data, path) else data


def parse_json(text: str, path: Path) -> Any:
    """JSON text of `path` as Python values, or a ConfigError saying where it is wrong."""
    try:
        return _loads(text, path)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except RecursionError:
        raise _too_deep(path) from None
    except ValueError as error:  # e.g. a number longer than Python converts (sys.get_int_max_str_digits)
        raise ConfigError(f"{path}: invalid JSON: {_number_text(error)}") from None


# A string, or a comma before a closing bracket (outside strings).
_TRAILING_COMMA = re.compile(r'("(?:\\.|[^"\\])*")|,(\s*[}\]])')


def _without_trailing_commas(text: str) -> str:
    return _TRAILING_COMMA.sub(lambda m: m.group(1) or m.group(2), text)


MANY_KEYS_BYTES = 1 << 20  # JSON files from this size up are first read by many_keys.select


def _selected(data: bytes, path: Path, recognised: Collection[str] | None, unknown: int) -> Any:
    """many_keys.select's reading of a large JSON file, or None (see read_config_file)."""
    if recognised is None or len(data) < MANY_KEYS_BYTES:
        return None
    if not data.isascii():
        _decode(data, path)  # a ConfigError when it is not UTF-8
    from simpletuner.config import many_keys  # numpy: only for large files

    return many_keys.select(data, recognised, unknown, MAX_DEPTH)


def _read_json(path: Path, recognised: Collection[str] | None = None, unknown: int = 0) -> RawConfig:
    data = _read_bytes(path)
    selection = _selected(data, path, recognised, unknown)
    text = selection.text if selection is not None else _decode(data, path)
    warnings = []
    try:
        data = parse_json(text, path)
    except ConfigError as error:
        try:  # SimpleTuner's own example configs end some objects with a trailing comma
            data = parse_json(_without_trailing_commas(text), path)
        except ConfigError:
            raise error from None
        warnings.append(f"{path}: a trailing comma was accepted (strict JSON has none)")
    if isinstance(data, list):
        raise ConfigError(f"{path} holds a list, like a dataset file (multidatabackend.json); a configuration is "
                          "an object of options. Point data_backend_config at the dataset file instead.")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a configuration is a JSON object of options, not {type(data).__name__}")
    raw = RawConfig(warnings=warnings, left_out=selection.left_out if selection is not None else 0)
    raw.update(_without_dashes(data, text), str(path))
    return raw


def _read_toml(path: Path) -> RawConfig:
    text = _read_text(path)
    try:
        data = _check_depth(tomllib.loads(text), path)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except RecursionError:
        raise _too_deep(path) from None
    except ValueError as error:  # e.g. a number longer than Python converts
        raise ConfigError(f"{path}: invalid TOML: {_number_text(error)}") from None
    raw = RawConfig()
    datasets = data.pop("datasets", None)
    if datasets is not None and not isinstance(datasets, list):
        raise ConfigError(f"{path}: datasets must be [[datasets]] tables (a list of entries), not "
                          f"{type(datasets).__name__}")
    raw.datasets = datasets
    raw.update(_without_dashes(data, text), str(path))
    return raw


# config.env ---------------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(\+?=)(.*)$")
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _env_value(text: str, known: dict[str, str], where: str, used: set[str]) -> str:
    """The value of one assignment, as a shell would see it (quotes, comments, $VAR)."""
    if "$(" in text or "`" in text:
        raise ConfigError(f"{where}: shell commands and arithmetic ($(...), `...`) are not evaluated; "
                          "write the value itself")
    if not text.lstrip().startswith("'"):
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            used.add(name)
            return known.get(name, os.environ.get(name, ""))

        text = _REFERENCE.sub(substitute, text)
    try:
        words = shlex.split(text, comments=True, posix=True)
    except ValueError as error:
        raise ConfigError(f"{where}: cannot read the value ({error}): {text.strip()}") from None
    return " ".join(words)


def _read_env_assignments(path: Path) -> tuple[list[tuple[str, str, str]], set[str]]:
    """[(variable, value, 'file:line')] in file order, and the variables that others refer to."""
    assignments: list[tuple[str, str, str]] = []
    known: dict[str, str] = {}
    used: set[str] = set()
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{number}"
        match = _ASSIGNMENT.match(stripped)
        if not match:
            raise ConfigError(f"{where}: not an assignment: {stripped!r}; config.env holds lines like "
                              "export KEY=value (or KEY=value)")
        name, operator, text = match.groups()
        value = _env_value(text, known, where, used)
        if operator == "+=" and known.get(name):
            value = f"{known[name]} {value}".strip()
        known[name] = value
        assignments.append((name, value, where))
    return assignments, used


def _env_option(name: str) -> str | None:
    if name in ENV_NAMES:
        return ENV_NAMES[name]
    from simpletuner.config.schema import TrainingConfig

    lowered = name.lower()
    return lowered if lowered in TrainingConfig.model_fields else None


def _read_env(path: Path) -> RawConfig:
    assignments, used = _read_env_assignments(path)
    raw = RawConfig()
    final = {name: (value, where) for name, value, where in assignments}  # the last assignment wins
    # Argument lists come last, as SimpleTuner appends them after the mapped variables.
    ordered = sorted(final.items(), key=lambda item: item[0] in ENV_ARGUMENT_LISTS)
    for name, (value, where) in ordered:
        if name in ENV_ARGUMENT_LISTS:
            raw.update(parse_arguments(shlex.split(value), f"{where} ({name})"), f"{where} ({name})")
        elif (option := _env_option(name)) is not None:
            raw.update({option: value}, f"{where} ({name})")
        elif name in ENV_LAUNCHER:
            raw.warnings.append(f"{where}: {name} is a launcher setting and is not read here: {ENV_LAUNCHER[name]}")
        elif name not in used:  # a helper only other lines refer to is fine
            choices = list(ENV_NAMES) + list(ENV_ARGUMENT_LISTS)
            close = get_close_matches(name, choices, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else (
                "; variables are SimpleTuner's (MODEL_NAME, LEARNING_RATE, ...) or an option name in capitals")
            raise ConfigError(f"{where}: unknown setting {name}{hint}")
    return raw
