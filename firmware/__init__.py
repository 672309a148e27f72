"""edge-recorder firmware: config, call engine, recorder, encrypted store, catalogue, audit."""

import os

__version__ = "0.1.0"

# Single-threaded OpenBLAS before numpy is imported (see drivers/__init__.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
