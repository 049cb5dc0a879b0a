"""Typed configurations: dataclasses whose fields document themselves.

A field made with :func:`option` carries its help text (and, where the command line spells it
otherwise, its flag and its choices) in its metadata. :func:`to_dict` and :func:`from_dict`
round-trip a config through JSON, nested configs included, and refuse unknown or mistyped settings
with a message naming them. The command line generates its flags from the same fields
(:mod:`speechmimic.cli._options`), so every setting is written once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

from speechmimic.errors import InputError

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices=None,
    factory=None,
):
    """A dataclass field with its help text; ``flag`` and ``metavar`` override the CLI's spelling
    (``--field-name``), ``choices`` restricts it; ``factory`` makes a default per instance."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """The type of field ``name`` of ``cls`` with ``| None`` taken off, and whether it was optional."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return f.default


def to_dict(cfg) -> dict:
    """A config as JSON-able values (nested configs as dicts)."""
    return dataclasses.asdict(cfg)


def _coerce(cls: type, name: str, value: Any) -> Any:
    typ, optional = field_type(cls, name)
    where = f"{cls.__name__}.{name}"
    if value is None:
        if optional:
            return None
        raise InputError(f"setting {where} may not be null")
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise InputError(f"setting {where} must be an object of {typ.__name__} settings, got {value!r}")
        return from_dict(typ, value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(typ, True)
    if not ok:
        raise InputError(f"setting {where} must be {typ.__name__}, got {value!r}")
    return float(value) if typ is float else value


def from_dict(cls: type, data: dict):
    """Build ``cls`` from a dict such as :func:`to_dict` writes; missing settings take their defaults."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"unknown {cls.__name__} setting(s) {unknown}; valid: {names}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data and f.default is _MISSING and f.default_factory is _MISSING
    ]
    if missing:
        raise InputError(f"{cls.__name__} needs the setting(s) {missing}")
    return cls(**{k: _coerce(cls, k, v) for k, v in data.items()})


def read(path: str | os.PathLike) -> dict:
    """The settings in a JSON file: the object ``--print-config`` prints, or a ``result.json`` that
    records one under ``"config"``."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file holds one JSON object of settings")
    return data


def from_env(cls: type, prefix: str, environ: typing.Mapping[str, str] | None = None) -> dict:
    """The settings of ``cls`` given as environment variables ``<prefix><FIELD_NAME>`` (scalar fields
    only), parsed to the field's type; a value that does not parse is refused, naming the variable."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name.upper()
        if name not in environ:
            continue
        typ, optional = field_type(cls, f.name)
        raw = environ[name]
        if optional and raw.strip().lower() in ("", "none", "null"):
            out[f.name] = None
        elif typ is bool:
            if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise InputError(f"{name}={raw!r}: expected true or false")
            out[f.name] = raw.strip().lower() in ("1", "true", "yes")
        elif typ in (int, float):
            try:
                out[f.name] = typ(raw)
            except ValueError:
                raise InputError(f"{name}={raw!r}: expected {typ.__name__}") from None
        elif typ is str:
            out[f.name] = raw
    return out
