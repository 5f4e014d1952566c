"""Validation of parsed YAML against the schema, with each problem at its key path.

pydantic reports locations as tuples and messages in its own words; this
module turns them into ``routes[0].backends[1].url: expected a ws:// URL``.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from wsgate.errors import ConfigError

from .schema import Config
from .units import show_value

# Beyond this many problems the list stops helping and starts scrolling.
_MAX_LISTED_PROBLEMS = 20


def parse_config(data: Any, file: str | None = None) -> Config:
    """Validate an already-parsed mapping; errors name the key path, e.g. routes[0].name."""
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping", file)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = _problems(exc)
    (path, message), rest = problems[0], problems[1:]
    lines = [message]
    lines += [f"  {p}: {m}" if p else f"  {m}" for p, m in rest[:_MAX_LISTED_PROBLEMS]]
    if len(rest) > _MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(rest) - _MAX_LISTED_PROBLEMS} more problems")
    raise ConfigError(path, "\n".join(lines), file) from None


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Each pydantic error as (key path, human sentence), in document order."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"]) + tuple(error.get("ctx", {}).get("wsgate_loc", ()))
        about_key = error["type"] in ("extra_forbidden", "invalid_key")
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(loc)
        elif error["type"] == "invalid_key":
            message = f"keys must be strings, got {show_value(loc[-1])}"
        else:
            message = _describe(error)
        problems.append((_format_loc(loc, key_last=about_key), message))
    return problems


# pydantic puts these in locations for some validators and unions; they are not YAML keys.
_INTERNAL_LOC = re.compile(r"function-(before|after|wrap|plain)\[.*\]|.*\[.*\]")


def _format_loc(loc: tuple[Any, ...], key_last: bool = False) -> str:
    out = ""
    for i, part in enumerate(loc):
        is_key = key_last and i == len(loc) - 1
        if isinstance(part, int) and not is_key:
            out += f"[{part}]"
        elif isinstance(part, str) and _INTERNAL_LOC.fullmatch(part) and not is_key:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type inside."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc`, found by walking the schema."""
    current: Any = Config
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int) and typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        elif (
            isinstance(part, str)
            and isinstance(current, type)
            and issubclass(current, BaseModel)
            and part in current.model_fields
        ):
            current = current.model_fields[part].annotation
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key"
    fields = list(model.model_fields)
    message = f"unknown key; expected one of: {', '.join(fields)}"
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


_INT_ERRORS = {"int_type", "int_parsing", "int_from_float"}
_BOOL_ERRORS = {"bool_type", "bool_parsing"}
_MAPPING_ERRORS = {"model_type", "model_attributes_type", "dict_type"}


def _describe(error: Any) -> str:
    """A sentence for one pydantic error; pydantic's own wording as a fallback."""
    kind = error["type"]
    value = error.get("input")
    if kind == "wsgate":
        return error["msg"]
    if kind == "missing":
        return "missing required key"
    if kind in _MAPPING_ERRORS:
        return f"expected a mapping of keys to values, got {show_value(value)}"
    if kind == "list_type":
        return f"expected a list, got {show_value(value)}"
    if kind == "too_short":
        return "must have at least one entry"
    if kind == "string_type":
        return f"expected a string, got {show_value(value)}"
    if kind in _BOOL_ERRORS:
        return f"expected true or false, got {show_value(value)}"
    if kind in _INT_ERRORS:
        return f"expected a whole number, got {show_value(value)}"
    if kind == "literal_error":
        return f"expected {error['ctx']['expected']}, got {show_value(value)}"
    message: str = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message
