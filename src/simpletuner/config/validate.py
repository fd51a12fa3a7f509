"""Raw options -> a schema model, or one ConfigError that lists every problem a person can fix.

Order of business for each key: SimpleTuner's other spellings are renamed; keys that
cannot change training are ignored with a warning; unsupported SimpleTuner options are
errors (unless set to their "off" value); any other unknown key is an error naming the
closest valid names. Values are converted the way a person means them (strings from
env files and the command line, numbers where text is expected), then pydantic checks
them and its complaints are rewritten as sentences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import get_close_matches
from itertools import compress, filterfalse, islice
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from simpletuner.config import types
from simpletuner.config.compat import VALUE_ALIASES, VALUE_HINTS, Unsupported

Model = TypeVar("Model", bound=BaseModel)

_NULL_WORDS = {"none", "null"}
_INT64 = 2**63 - 1  # the largest whole number torch, numpy and the loop can count to
SUGGESTED_UNKNOWN = 20  # unknown keys named one by one (each with its nearest valid names); the rest are counted


@dataclass
class Compat:
    """How one kind of entry (training options or dataset entries) treats foreign keys."""

    aliases: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, Unsupported] = field(default_factory=dict)
    command_line: bool = False  # whether --key VALUE can supply a missing option


@dataclass
class Outcome:
    """A validated model, or the problems that stop it; warnings either way."""

    model: BaseModel | None
    problems: list[str]
    warnings: list[str]


def suggest(name: str, candidates: list[str]) -> str:
    """'; did you mean a or b?' for close names, else ''."""
    close = get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[name.lower()]] if name.lower() in lowered else []
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _where(sources: dict[str, str], key: str, default: str) -> str:
    return sources.get(key, default)


def _rename_aliases(values: dict[str, Any], sources: dict[str, str], compat: Compat, origin: str,
                    problems: list[str]) -> None:
    for old, new in compat.aliases.items():
        if old not in values:
            continue
        if new in values:
            problems.append(f"{old} and {new} are the same option, given twice ({_where(sources, old, origin)}); "
                            f"keep {new}")
            values.pop(old)
            continue
        values[new] = values.pop(old)
        if old in sources:
            sources[new] = sources.pop(old)


def recognised_names(model: type[BaseModel], compat: Compat) -> frozenset[str]:
    """The keys `validate` reads one by one: the model's fields and the other spellings `compat` knows."""
    return frozenset(model.model_fields.keys() | compat.aliases.keys() | compat.ignored.keys()
                     | compat.unsupported.keys())


def _without_most_unknown(values: dict[str, Any], sources: dict[str, str], model: type[BaseModel], compat: Compat
                          ) -> tuple[dict[str, Any], dict[str, str], int]:
    """Copies of `values` and `sources` keeping, in file order, every key the model or `compat` knows and the first
    unknown keys (one more than are named); and how many unknown keys were left out (a file may hold millions:
    they are counted, not copied or looked at one by one)."""
    names = recognised_names(model, compat)
    present = {name for name in names if name in values}
    if len(values) - len(present) <= SUGGESTED_UNKNOWN + 1:
        return dict(values), dict(sources), 0
    present.update(islice(filterfalse(names.__contains__, values), SUGGESTED_UNKNOWN + 1))
    kept = dict(compress(values.items(), map(present.__contains__, values)))
    return kept, {key: sources[key] for key in kept if key in sources}, len(values) - len(kept)


def _foreign_keys(values: dict[str, Any], sources: dict[str, str], model: type[BaseModel], compat: Compat,
                  origin: str, problems: list[str], warnings: list[str], dropped: int = 0) -> None:
    """Ignored, unsupported and unknown keys reported and removed from `values`; `dropped` unknown keys were
    left out before (counted with the unknown keys past the named ones)."""
    fields = model.model_fields
    known = list(fields)
    foreign = list(filterfalse(fields.__contains__, values))  # filtered in C: a file may hold millions of keys
    unknown = dropped
    seen: set[str] = set()  # ignored and unsupported keys handled so far
    for index, key in enumerate(foreign):
        if key in compat.ignored or key in compat.unsupported:
            seen.add(key)
            _foreign_key(key, values[key], _where(sources, key, origin), compat, problems, warnings)
        elif unknown - dropped < SUGGESTED_UNKNOWN:
            unknown += 1
            hint = suggest(key, known + list(compat.aliases)) or "; `simpletuner options` lists every option"
            problems.append(f"unknown option {key!r} in {_where(sources, key, origin)}{hint}")
        else:  # the rest are counted, not named: a suggestion for each of millions of keys takes minutes
            rest = [k for k in (*compat.ignored, *compat.unsupported) if k in values and k not in seen
                    and k not in fields]
            unknown += len(foreign) - index - len(rest)
            for other in rest:
                _foreign_key(other, values[other], _where(sources, other, origin), compat, problems, warnings)
            break
    if foreign:
        kept = dict(compress(values.items(), map(fields.__contains__, values)))
        values.clear()
        values.update(kept)
    if unknown > SUGGESTED_UNKNOWN:
        problems.append(f"... and {unknown - SUGGESTED_UNKNOWN} more unknown options in {origin} "
                        f"({unknown} in all; the first {SUGGESTED_UNKNOWN} are named above)")


def _foreign_key(key: str, value: Any, where: str, compat: Compat, problems: list[str], warnings: list[str]) -> None:
    """An ignored key (a warning) or an unsupported one (a problem unless its value asks for nothing)."""
    if key in compat.ignored:
        warnings.append(f"ignored: {key} ({compat.ignored[key]}) in {where}")
        return
    rule = compat.unsupported[key]
    if rule.is_harmless(value):
        warnings.append(f"ignored: {key}={value!r} (unsupported: {rule.reason}; this value asks for "
                        f"nothing) in {where}")
    else:
        problems.append(f"unsupported: {key} ({rule.reason}) in {where}")


def _convert(name: str, value: Any, annotation: Any) -> tuple[bool, Any]:
    """(keep, value): values as a person means them; keep=False drops the key (use the default)."""
    allowed = types.choices(annotation)
    if value is None and not types.accepts_none(annotation):
        return False, None  # SimpleTuner writes null for "the default"
    if isinstance(value, str):
        if value.strip() == "" and types.accepts_none(annotation):
            return True, None
        if (value.strip().lower() in _NULL_WORDS and types.accepts_none(annotation)
                and not types.accepts(annotation, str)):
            return True, None
        value = VALUE_ALIASES.get((name, value), value)
        if allowed and value not in allowed:
            for choice in allowed:  # "64" for 64, "LoRA" for "lora"
                if str(choice).lower() == value.strip().lower():
                    return True, choice
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if (types.accepts(annotation, str) and not types.accepts(annotation, int)
                and not types.accepts(annotation, float) and not allowed):
            return True, str(value)
    return True, value


def _prepare(values: dict[str, Any], sources: dict[str, str], model: type[BaseModel], origin: str,
             problems: list[str]) -> dict[str, Any]:
    prepared: dict[str, Any] = {}
    for key, value in values.items():
        field_info = model.model_fields[key]
        annotation = field_info.annotation
        if value is None and field_info.is_required():
            allowed = types.choices(annotation)
            accepted = f"one of: {', '.join(map(str, allowed))}" if allowed else types.type_name(annotation)
            problems.append(f"{key}: null is not accepted (from {_where(sources, key, origin)}); this option is "
                            f"required: {accepted}")
            continue
        if isinstance(value, bool) and not types.accepts(annotation, bool) and value not in types.choices(annotation):
            # pydantic would read true as 1; a bare --flag for a valued option is a mistake.
            problems.append(f"{key}: {'true' if value else 'false'} is not accepted (from {_where(sources, key, origin)}); "
                            f"it takes a value of type {types.type_name(annotation)}, e.g. --{key} VALUE")
            continue
        keep, converted = _convert(key, value, annotation)
        if keep:
            prepared[key] = converted
    return prepared


def _range_text(message: str) -> str:
    return message.replace("Input should be ", "must be ").replace("Input should have ", "must have ")


def _missing(key: str, annotation: Any, where: str, command_line: bool) -> str:
    allowed = types.choices(annotation) if annotation is not None else []
    accepted = f" (one of: {', '.join(map(str, allowed))})" if allowed else ""
    if command_line and "." not in key:
        return (f"missing required option {key}{accepted}: set {key} in the configuration file or pass "
                f"--{key} VALUE")
    return f"missing required option {key}{accepted} in {where}: set it"


def _unknown_nested(key: str, annotation: Any, where: str) -> str:
    nested = types.is_model(annotation) if annotation is not None else None
    hint = suggest(key.rsplit(".", 1)[-1], list(nested.model_fields)) if nested else ""
    return f"unknown option {key!r} in {where}{hint}"


def explain(error: dict[str, Any], model: type[BaseModel], sources: dict[str, str], origin: str,
            command_line: bool = False) -> str:
    """One pydantic error as a sentence: the key, what was given, what is accepted, where."""
    loc = [str(part) for part in error.get("loc", ())]
    key = ".".join(loc)
    top = loc[0] if loc else ""
    where = _where(sources, top, origin)
    kind = error["type"]
    given = error.get("input")
    annotation = model.model_fields[top].annotation if top in model.model_fields else None
    if kind == "missing":
        return _missing(key, annotation, where, command_line)
    if kind == "extra_forbidden":
        return _unknown_nested(key, annotation, where)
    if kind in ("literal_error", "enum"):
        allowed = [str(c) for c in types.choices(annotation)] if annotation is not None else []
        if not allowed and error.get("ctx", {}).get("expected"):  # a nested option (a list of models)
            allowed = [str(error["ctx"]["expected"])]
        hint = VALUE_HINTS.get((top, str(given)))
        close = suggest(str(given), allowed)
        return (f"{key}: {given!r} is not accepted (from {where}); accepted: {', '.join(allowed)}"
                f"{close}{'; ' + hint if hint else ''}")
    if kind in ("bool_parsing", "bool_type"):
        return f"{key}: {given!r} is not a boolean (from {where}); accepted: true or false"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{key}: {given!r} is not a whole number (from {where})"
    if kind in ("float_parsing", "float_type"):
        return f"{key}: {given!r} is not a number (from {where})"
    if kind in ("string_type",):
        return f"{key}: {given!r} is not text (from {where})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}: {given!r} is out of range (from {where}); {_range_text(error['msg'])}"
    if kind == "value_error" and not loc:
        return f"{error['msg'].removeprefix('Value error, ')} (in {origin})"
    expected = _range_text(error["msg"])
    return f"{key}: {given!r} is not accepted (from {where}); {expected}" if key else f"{expected} (in {origin})"


def _explain_all(error: ValidationError, model: type[BaseModel], values: dict[str, Any], sources: dict[str, str],
                 origin: str, command_line: bool) -> list[str]:
    messages: list[str] = []
    unions_done: set[str] = set()
    for item in error.errors(include_url=False):
        top = str(item["loc"][0]) if item["loc"] else ""
        if item["type"] == "missing" and len(item["loc"]) == 1 and top in values:
            continue  # given, but already reported as a bad value
        field_info = model.model_fields.get(top)
        if field_info is not None and len(item["loc"]) > 1 and types.is_union_of_values(field_info.annotation):
            # pydantic reports each member of a union (str, list[str]...): say it once.
            if top not in unions_done:
                unions_done.add(top)
                messages.append(f"{top}: {values.get(top)!r} is not accepted (from {_where(sources, top, origin)}); "
                                f"it takes {types.type_name(field_info.annotation)}")
            continue
        messages.append(explain(item, model, sources, origin, command_line))
    return messages


def validate(model: type[Model], values: dict[str, Any], sources: dict[str, str], compat: Compat,
             origin: str, left_out: int = 0) -> Outcome:
    """Check `values` against `model`; `origin` names the file for keys without a recorded source; `left_out`
    unknown keys were counted, not read, before (RawConfig.left_out)."""
    values, sources, dropped = _without_most_unknown(values, sources, model, compat)
    dropped += left_out
    problems: list[str] = []
    warnings: list[str] = []
    _rename_aliases(values, sources, compat, origin, problems)
    _foreign_keys(values, sources, model, compat, origin, problems, warnings, dropped)
    prepared = _prepare(values, sources, model, origin, problems)
    try:
        instance = model.model_validate(prepared)
    except ValidationError as error:
        problems.extend(_explain_all(error, model, values, sources, origin, compat.command_line))
        return Outcome(None, problems, warnings)
    problems.extend(_huge_numbers(instance, sources, origin))
    return Outcome(None if problems else instance, problems, warnings)


def _huge_numbers(instance: BaseModel, sources: dict[str, str], origin: str) -> list[str]:
    """Whole numbers beyond 64 bits (pydantic takes any size; torch and the loop cannot)."""
    return [f"{key}: a number of {value.bit_length()} bits is out of range (from {_where(sources, key, origin)}); "
            f"whole numbers go up to {_INT64} (63 bits)"
            for key, value in instance if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT64]
