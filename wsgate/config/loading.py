"""Reading config files: YAML with repeated keys refused, ``${VAR}`` substitution, the admin token.

A failure is a ``ConfigError`` naming the file and, where there is one, the
key path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from wsgate.errors import ConfigError

from .schema import Admin, Config
from .validation import parse_config


class _Loader(yaml.SafeLoader):
    """safe_load, except that a repeated key is an error instead of a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


class _WholeReference(str):
    """An unquoted scalar that is one ``${...}`` and nothing else; its value is typed once substituted."""


_WHOLE_REFERENCE_TAG = "tag:wsgate,2026:whole-reference"
# Implicit resolvers see plain scalars only: a quoted "${PORT}" stays a string.
_Loader.add_implicit_resolver(_WHOLE_REFERENCE_TAG, re.compile(r"\$\{[^}]*\}\Z"), ["$"])
_Loader.add_constructor(
    _WHOLE_REFERENCE_TAG, lambda loader, node: _WholeReference(loader.construct_scalar(node))
)

# $$, ${NAME} or ${NAME:-default}, where a default's own "$" is written "$$" too;
# the last alternative is a "${" that starts no reference.
_REFERENCE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>(?:[^$}]|\$\$)*))?\}|\$\{"
)
# What substitution may turn a whole unquoted reference into: YAML's plain scalar types.
_TYPED_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool", "null")}


def _typed(text: str) -> Any:
    """`text` as YAML reads it unquoted, when that is a number, a boolean or null; else the string."""
    loader = _Loader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        if tag not in _TYPED_TAGS:
            return text
        return loader.construct_object(yaml.ScalarNode(tag, text))
    finally:
        loader.dispose()


def _substitute_string(value: str, path: str, environ: Mapping[str, str]) -> Any:
    def replace(reference: re.Match[str]) -> str:
        if reference.group() == "$$":
            return "$"
        name, default = reference.group("name"), reference.group("default")
        if name is None:
            raise ConfigError(path, "expected ${NAME} or ${NAME:-default} after '${'; write $$ for a '$'")
        if environ.get(name):
            return environ[name]
        if default is not None:
            return default.replace("$$", "$")
        if name in environ:
            return ""
        raise ConfigError(path, f"environment variable {name} is not set, and ${{{name}}} has no default")

    text = _REFERENCE.sub(replace, value)
    return _typed(text) if isinstance(value, _WholeReference) else text


def substitute_environment(data: Any, environ: Mapping[str, str]) -> Any:
    """`data` with ``${NAME}`` and ``${NAME:-default}`` in every string value replaced from `environ`.

    ``$$`` is one ``$``; a ``$`` before anything else stays as it is. The default
    applies when the variable is unset or empty; an unset variable without one is a
    ``ConfigError`` at the value's key path. Keys are left alone, and a value never
    becomes a list or a mapping, but a whole unquoted reference is typed as YAML
    types a plain value (``workers: ${WORKERS:-2}`` is a number).
    """

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {
                str(key) if isinstance(key, str) else key: walk(item, f"{path}.{key}" if path else str(key))
                for key, item in value.items()
            }
        if isinstance(value, list):
            return [walk(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, str):
            return _substitute_string(value, path, environ)
        return value

    return walk(data, "")


def dump_config_data(data: Any) -> str:
    """YAML text that ``load_config_data`` reads back as `data`: each ``$`` is written as ``$$``."""

    def escape(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: escape(item) for key, item in value.items()}
        if isinstance(value, list):
            return [escape(item) for item in value]
        if isinstance(value, str):
            return value.replace("$", "$$")
        return value

    return yaml.safe_dump(escape(data))


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        message = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            ctx = exc.context_mark
            message += f" ({exc.context} at line {ctx.line + 1}, column {ctx.column + 1})"
        return message
    return f"invalid YAML: {exc}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file; any failure is a ``ConfigError``."""
    return parse_config(load_config_data(path), os.fspath(path))


def load_config_data(path: str | os.PathLike[str]) -> Any:
    """A config file's YAML as plain data, environment substituted, not yet validated.

    A failure is a ``ConfigError``.
    """
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
        raise ConfigError("", f"cannot read config file: {reason}", file) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"cannot read config file: not UTF-8 text (byte {exc.start})", file
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError("", _yaml_message(exc), file) from None
    # After parsing, not before: a variable's value can then never add YAML structure.
    try:
        return substitute_environment(data, os.environ)
    except ConfigError as exc:
        exc.file = file
        raise


def read_admin_token(admin: Admin) -> str | None:
    """The bearer token `admin.token_file` or `admin.token_env` names, or None when neither is set.

    Surrounding whitespace (a file's final newline) is not part of the token. A
    source that cannot be read, or holds no token, is a ``ConfigError``.
    """
    if admin.token_file is not None:
        path, where = "admin.token_file", admin.token_file
        try:
            with open(admin.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
            raise ConfigError(path, f"cannot read token file {where}: {reason}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(path, f"token file {where} is not UTF-8 text (byte {exc.start})") from None
    elif admin.token_env is not None:
        path, where = "admin.token_env", admin.token_env
        token = os.environ.get(admin.token_env, "").strip()
        if admin.token_env not in os.environ:
            raise ConfigError(path, f"environment variable {where} is not set")
    else:
        return None
    if not token:
        raise ConfigError(path, f"{where} holds an empty token")
    # What goes after "Bearer " in a header: visible ASCII, no spaces.
    if not all("!" <= c <= "~" for c in token):
        raise ConfigError(path, f"the token in {where} must be visible ASCII characters, without spaces")
    return token
