"""edge-recorder firmware: config, call engine, recorder, encrypted store, catalogue, audit."""

__version__ = "0.1.0"
