"""Spec strings -> :class:`~speechmimic.targets.base.Target` instances.

A spec is ``<kind>[:<location>][?key=value&...]``:

- ``hf:<local dir or hub id>?layers=...&padding=per_clip|bucket&batch_seconds=60``
- ``whisper:<tiny.en | base | DIR | hub id>?layers=...&window=real|native``: Whisper's encoder (see
  :mod:`speechmimic.targets.whisper`)
- ``resemblyzer?layers=...&padding=per_clip&weights=FILE`` (``weights``: a fine-tuned copy, e.g. a
  watermarked one, in resemblyzer's checkpoint layout)
- ``http://host:port[/prefix]?key_env=VAR&concurrency=8&timeout=60&retries=8&dtype=float32`` (or
  ``https://``): an embedding API (see :mod:`speechmimic.targets.http`)

Backends are imported only when a spec asks for them, so importing this module stays cheap.
"""

from __future__ import annotations

import os

from speechmimic.errors import InputError
from speechmimic.targets.base import Target

# How a spec of each kind is written, for messages that list them.
FORMS = {
    "hf": "hf:<local dir or hub id>",
    "whisper": "whisper:<tiny.en, base, a folder or a hub id>",
    "resemblyzer": "resemblyzer",
    "http": "http://host:port",
    "https": "https://host:port",
}
_HTTP_OPTIONS = ("key_env", "concurrency", "timeout", "retries", "dtype")
# kind -> (takes a location, accepted option keys)
_KINDS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "hf": (True, ("layers", "padding", "batch_seconds")),
    "whisper": (True, ("layers", "window")),
    "resemblyzer": (False, ("layers", "padding", "weights")),
    "http": (True, _HTTP_OPTIONS),
    "https": (True, _HTTP_OPTIONS),
}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split ``spec`` into ``(kind, location, options)``; ``location`` is ``""`` for kinds without one.

    Raises ``ValueError`` for an unknown kind, a missing or unexpected location, a malformed or
    repeated option, or an option the kind does not accept; the message lists what is valid.
    """
    if "|" in spec:
        raise InputError(
            f"{spec!r} is a defended spec (target|defence|...): load it with speechmimic.defences.load_target"
        )
    head, sep, query = spec.partition("?")
    kind, colon, location = head.partition(":")
    kind = kind.strip()
    if kind not in _KINDS:
        raise InputError(f"unknown target kind {kind!r} in spec {spec!r}; valid kinds: {sorted(_KINDS)}")
    takes_location, valid_keys = _KINDS[kind]
    if takes_location and not location:
        raise InputError(f"spec {spec!r} needs a location: {kind}:<local dir or hub id>")
    if not takes_location and colon:
        raise InputError(f"target kind {kind!r} takes no location, got {spec!r}")

    options = parse_options(query if sep else "", f"spec {spec!r}")
    unknown = [key for key in options if key not in valid_keys]
    if unknown:
        raise InputError(
            f"unknown option {unknown[0]!r} for target kind {kind!r}; valid options: {list(valid_keys)}"
        )
    return kind, location, options


def parse_options(query: str, where: str) -> dict[str, str]:
    """``key=value&...`` as a dict; ValueError for a malformed or repeated option (``where`` names
    the spec in the message)."""
    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise InputError(f"malformed option {item!r} in {where}; expected key=value")
        if key in options:
            raise InputError(f"option {key!r} given twice in {where}")
        options[key] = value
    return options


def load_backend(spec: str, device: str = "cpu") -> Target:
    """Build the one backend a spec names (no defences: see :func:`speechmimic.defences.load_target`).
    The returned target's ``spec`` is a canonical form of ``spec``
    (layers resolved to explicit indices, padding policy spelled out) that rebuilds it."""
    kind, location, options = parse_spec(spec)
    if kind == "hf":
        from speechmimic.targets.hf import HUB_ID, HFTarget

        # transformers reads a location that is neither a folder nor a hub id as a malformed hub id.
        if not os.path.isdir(location) and not HUB_ID.fullmatch(location):
            forms = ", ".join(FORMS.values())
            raise InputError(
                f"{spec!r}: {location!r} is no such directory, and not a hub id ('name' or "
                f"'namespace/name'); a target spec is one of {forms}, each with ?key=value&... options"
            )
        return HFTarget(
            location,
            layers=options.get("layers"),
            padding=options.get("padding", "per_clip"),
            batch_seconds=_number(options, "batch_seconds", float, 60.0, above=0),
            device=device,
        )
    if kind == "whisper":
        from speechmimic.targets.whisper import WhisperTarget

        return WhisperTarget(
            location, layers=options.get("layers"), window=options.get("window", "real"), device=device
        )
    if kind in ("http", "https"):
        from speechmimic.targets.http import DEFAULT_KEY_ENV, HTTPTarget

        if not location.startswith("//"):
            raise InputError(f"spec {spec!r} is not a URL: expected {kind}://host:port[/prefix]")
        return HTTPTarget(
            f"{kind}:{location}",
            key_env=options.get("key_env", DEFAULT_KEY_ENV),
            concurrency=_number(options, "concurrency", int, 8, least=1),
            timeout=_number(options, "timeout", float, 60.0, above=0),
            retries=_number(options, "retries", int, 8, least=0),
            dtype=options.get("dtype", "float32"),
        )
    from speechmimic.targets.resemblyzer import ResemblyzerTarget

    weights = options.get("weights")
    if weights is not None and not os.path.isfile(weights):
        raise InputError(f"{spec!r}: weights file {weights!r} does not exist")
    return ResemblyzerTarget(
        layers=options.get("layers"),
        padding=options.get("padding", "per_clip"),
        device=device,
        weights=weights,
    )


def _number(options: dict[str, str], key: str, kind: type, default, least=None, above=None):
    """Option ``key`` as a ``kind`` that is ``>= least`` or ``> above``; a clear error otherwise."""
    if key not in options:
        return default
    try:
        value = kind(options[key])
    except ValueError:
        value = None
    ok = value is not None and (least is None or value >= least) and (above is None or value > above)
    if not ok:
        number = "whole number" if kind is int else "number"
        bound = f"a {number} >= {least}" if least is not None else f"a {number} > {above}"
        if above == 0:
            bound = f"a positive {number}"
        raise InputError(f"option {key} must be {bound}, got {options[key]!r}")
    return value
