"""edge-recorder firmware: config, call engine, recorder, encrypted store, catalogue, audit."""

# drivers/__init__.py pins numpy's OpenBLAS to one thread; it must run before numpy is
# first imported, which a firmware module may do before any drivers module.
import drivers  # noqa: F401

__version__ = "0.1.0"
