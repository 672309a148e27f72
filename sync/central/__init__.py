"""The central compliance store: ingest workers, catalogue, anchoring, fleet, export.

``CentralStore`` and ``CentralClient`` (sync/central/ingest.py) are the ingest;
``python -m sync.central`` runs one worker from command-line options.
"""

from sync.central.ingest import CentralClient, CentralStore, Stats

__all__ = ["CentralClient", "CentralStore", "Stats"]
