"""Command-line options declared once, on a dataclass: a field whose metadata has a ``help`` text is the option
``--field-name`` (dashes for underscores) with the field's type, default and help, and reads back into the field.

Types: ``int``, ``float``, ``str``, ``Path`` and their ``X | None`` forms, and ``bool`` fields that default to False
(a flag: given means True). A field without ``help`` is a setting of the dataclass, not an option.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

OPTION_TYPES: tuple[type, ...] = (int, float, str, Path)
Config = TypeVar("Config")


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of the dataclass ``cls`` that are command-line options (those with a ``help`` text)."""
    return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


def option_name(field: dataclasses.Field) -> str:
    """``--train-images`` for the field ``train_images``."""
    return "--" + field.name.replace("_", "-")


def _value_type(cls: type, field: dataclasses.Field) -> type:
    """The field's type without ``| None``; TypeError for a type an option cannot have."""
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool or hint in OPTION_TYPES:
        return hint
    raise TypeError(f"{cls.__name__}.{field.name}: an option of type {hint} is not supported")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add an option to ``parser`` for each option field of the dataclass ``cls`` (see the module docstring)."""
    defaults = cls()
    for field in option_fields(cls):
        value_type, default = _value_type(cls, field), getattr(defaults, field.name)
        if value_type is bool:
            if default is not False:
                raise TypeError(f"{cls.__name__}.{field.name}: a flag must default to False")
            parser.add_argument(option_name(field), action="store_true", help=field.metadata["help"])
        else:
            parser.add_argument(option_name(field), type=value_type, default=default, help=field.metadata["help"])


def from_options(cls: type[Config], namespace: argparse.Namespace) -> Config:
    """The dataclass ``cls`` with its option fields as parsed into ``namespace`` (the others keep their defaults)."""
    values: dict[str, Any] = {field.name: getattr(namespace, field.name) for field in option_fields(cls)}
    return cls(**values)
