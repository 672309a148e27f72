"""Named registry of line backends, imported lazily.

A backend whose library is missing fails only when it is asked for, with a message
that says what to install. Add a backend by adding one row to ``BACKENDS``.
"""

from __future__ import annotations

import importlib
from typing import Any

import msgspec

from drivers.clock import Clock
from drivers.line import LineBackend, LineConfigError, LineUnavailable

# name -> (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "sim": ("drivers.sim.backend", "SimLine"),
}


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def backend_class(name: str) -> type[LineBackend]:
    """The class registered under ``name``; imports its module on first use."""
    try:
        module_name, class_name = BACKENDS[name]
    except KeyError:
        raise LineConfigError(
            f"unknown line backend {name!r}; known: {', '.join(backend_names())}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LineUnavailable(f"line backend {name!r} cannot be loaded: {exc}") from exc
    cls: type[LineBackend] = getattr(module, class_name)
    return cls


def parse_options(name: str, raw: dict[str, Any]) -> msgspec.Struct:
    """Validate ``[lines.options]`` against the backend's Options struct."""
    cls = backend_class(name)
    try:
        return msgspec.convert(raw, cls.Options, strict=True)
    except msgspec.ValidationError as exc:
        raise LineConfigError(f"{name} options: {exc}") from exc


def open_line(name: str, line_id: str, options: dict[str, Any] | msgspec.Struct, *,
              clock: Clock, country: str = "US") -> LineBackend:
    """Build (not yet open) the backend ``name`` for line ``line_id``."""
    cls = backend_class(name)
    opts = options if isinstance(options, msgspec.Struct) else parse_options(name, options)
    return cls(line_id, opts, clock=clock, country=country)
