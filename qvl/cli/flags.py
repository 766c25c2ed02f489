"""Command-line flags that set settings fields: each takes its type, placeholder, choices and help text
from the field it sets (`Field(description=...)` in qvl/settings/), so `--help` and the settings tree
cannot drift apart.

A flag's dest is `set:` followed by the field's dotted path (`set:router.port`); `settings_for` in
qvl/cli turns every such value that was given into an override of that field.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from qvl.settings import Settings

SET_PREFIX = "set:"


def setting_field(path: str) -> FieldInfo:
    """The field of the settings tree at a dotted path such as "router.auth.keys_file".

    Raises KeyError naming the first part of the path that does not exist."""
    model: type[BaseModel] = Settings
    parts = path.split(".")
    for depth, name in enumerate(parts, start=1):
        field = model.model_fields.get(name)
        if field is None:
            raise KeyError(f"no setting {'.'.join(parts[:depth])}")
        if depth == len(parts):
            return field
        nested = field.annotation
        if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            raise KeyError(f"setting {'.'.join(parts[:depth])} is a value, not a section")
        model = nested
    raise KeyError("empty settings path")


def setting_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    path: str,
    *,
    aliases: tuple[str, ...] = (),
    help: str | None = None,
    metavar: str | None = None,
    type: Callable[[str], Any] | None = None,
    action: str | None = None,
    const: Any = None,
) -> argparse.Action:
    """Add `flag` (and `aliases`), which sets the settings field at `path` when given.

    Derived from the field unless passed: help (its description), type (int, float, str), choices
    (a Literal), a placeholder (PORT, HOST, SECONDS, N, PATH, ...), and for a bool field the pair
    `--flag/--no-flag`. A list field needs `action="append"` or a `type` that parses the whole list.
    Raises KeyError for a path that is not a field, TypeError for a field type it cannot derive."""
    field = setting_field(path)
    value_type, choices = _value_type(field.annotation)
    options: dict[str, Any] = {"dest": SET_PREFIX + path, "help": _help(help, field, path)}
    if action in ("store_const", "store_true", "store_false"):
        options["action"] = action
        if action == "store_const":
            options["const"] = const
        return parser.add_argument(flag, *aliases, **options)
    if value_type is bool and action is None and type is None:
        return parser.add_argument(flag, *aliases, action=argparse.BooleanOptionalAction, **options)
    if action is not None:
        options["action"] = action
    if typing.get_origin(value_type) is list and action == "append":
        value_type, choices = _value_type(typing.get_args(value_type)[0])
    if type is not None:
        options["type"] = type
    elif value_type in (int, float, str):
        options["type"] = value_type
    else:
        raise TypeError(f"setting {path} ({field.annotation}): pass type= to parse it from the command line")
    if choices:
        options["choices"] = choices
    else:
        options["metavar"] = metavar or _placeholder(path.rsplit(".", 1)[-1], value_type)
    return parser.add_argument(flag, *aliases, **options)


def _value_type(annotation: Any) -> tuple[Any, list[str]]:
    """The type of a field's values without `| None`, and the choices when it is a Literal."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        remaining = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(remaining) == 1:
            annotation = remaining[0]
    if typing.get_origin(annotation) is Literal:
        choices = [str(choice) for choice in typing.get_args(annotation)]
        return str, choices
    return annotation, []


def _help(own: str | None, field: FieldInfo, path: str) -> str:
    text = own or field.description
    if not text:
        raise ValueError(f"setting {path} has no description for its flag's help")
    default = field.get_default(call_default_factory=True)
    # argparse %-formats help text.
    text = text.replace("%", "%%")
    if isinstance(default, int | float | str) and not isinstance(default, bool) and default != "":
        text += f" (default: {default})"
    return text


def _placeholder(name: str, value_type: Any) -> str:
    if name == "port" or name.endswith("_port"):
        return "PORT"
    if name == "host" or name.endswith("_host"):
        return "HOST"
    if name.endswith("_ms"):
        return "MS"
    if name.endswith("_s"):
        return "SECONDS"
    if name.endswith("_bytes"):
        return "BYTES"
    if name.endswith(("path", "file", "dir")):
        return "PATH"
    if name.endswith(("url", "replicas")) and value_type is str:
        return "URL"
    if name.endswith("name"):
        return "NAME"
    if value_type is int:
        return "N"
    if value_type is float:
        return "NUMBER"
    return name.upper()
