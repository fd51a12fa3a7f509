"""What a schema field accepts, read from its annotation: used to convert values and to describe options."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def _flatten(annotation: Any) -> list[Any]:
    """The members of a union (or the annotation itself)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [member for arg in typing.get_args(annotation) for member in _flatten(arg)]
    return [annotation]


def choices(annotation: Any) -> list[Any]:
    """The Literal values a field accepts ([] when it is not a choice)."""
    values: list[Any] = []
    for member in _flatten(annotation):
        if typing.get_origin(member) is Literal:
            values.extend(typing.get_args(member))
        elif typing.get_origin(member) is list:  # a list of choices (lora_format)
            values.extend(choices(typing.get_args(member)[0]))
    return values


def accepts(annotation: Any, kind: type) -> bool:
    """Whether the annotation admits plain values of `kind` (bool, int, float, str, NoneType)."""
    return any(member is kind for member in _flatten(annotation))


def accepts_none(annotation: Any) -> bool:
    return accepts(annotation, type(None))


def is_union_of_values(annotation: Any) -> bool:
    """A union of several plain types (e.g. text or list of text), not counting None or models."""
    members = [m for m in _flatten(annotation) if m is not type(None)]
    return len(members) > 1 and not any(isinstance(m, type) and issubclass(m, BaseModel) for m in members)


def is_model(annotation: Any) -> type[BaseModel] | None:
    for member in _flatten(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def type_name(annotation: Any) -> str:
    """A short human name: 'bool', 'int', 'float', 'text', 'choice', 'list of float', ..."""
    names: list[str] = []
    for member in _flatten(annotation):
        origin = typing.get_origin(member)
        if member is type(None):
            continue
        if origin is Literal:
            name = "choice"
        elif origin is list:
            (item,) = typing.get_args(member) or (Any,)
            name = f"list of {type_name(item)}"
        elif isinstance(member, type) and issubclass(member, BaseModel):
            name = "table"
        elif member is str:
            name = "text"
        else:
            name = getattr(member, "__name__", str(member))
        if name not in names:
            names.append(name)
    name = " or ".join(names)
    return f"{name} (optional)" if accepts_none(annotation) else name


def field_default(info: FieldInfo) -> Any:
    return None if info.is_required() else info.get_default(call_default_factory=True)
