"""``python -m sync.central``: one ingest worker from command-line options.

``--dir DIR --host H --port P --ca CA --cert CRT --key KEY --devices DIR --signing-key FILE``
plus ``--catalogue URL`` (default ``DIR/catalogue.db``), ``--worker-id`` and
``--share-group`` for several workers (docs/CENTRAL.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from firmware.keys import KeyFileError, load_or_create_signing_key
from sync.central.catalogue import CatalogueError, open_catalogue
from sync.central.ingest import CLIENT_ID, CentralClient, CentralStore
from sync.central.retention import apply_retention
from sync.protocol import WORKER_ID

log = logging.getLogger(__name__)


# --- command line -------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="python -m sync.central",
                     description="Minimal central store for the upload protocol.")
    parser.add_argument("--dir", type=Path, required=True, help="where recordings are stored")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--ca", type=Path, required=True, help="CA certificate (PEM)")
    parser.add_argument("--cert", type=Path, required=True, help="central's certificate")
    parser.add_argument("--key", type=Path, required=True, help="central's private key")
    parser.add_argument("--devices", type=Path, required=True,
                        help="folder of <device_id>.pub Ed25519 public keys (PEM)")
    parser.add_argument("--signing-key", type=Path, required=True,
                        help="central's Ed25519 key for audit receipts (created if absent)")
    parser.add_argument("--catalogue", help="sqlite:///PATH or postgresql://... "
                        "(default: DIR/catalogue.db)")
    parser.add_argument("--worker-id", default=CLIENT_ID,
                        help="this worker's name (its certificate CN)")
    parser.add_argument("--share-group", help="subscribe through $share/GROUP/...")
    return parser


def _check_files(args: argparse.Namespace) -> None:
    for name in ("ca", "cert", "key"):
        if not getattr(args, name).is_file():
            raise _UsageError(f"--{name}: {getattr(args, name)}: no such file")
    if not args.devices.is_dir():
        raise _UsageError(f"--devices: {args.devices}: not a folder")
    if not 1 <= args.port <= 65535:
        raise _UsageError(f"--port: {args.port} is not in 1..65535")
    if not WORKER_ID.fullmatch(args.worker_id):
        raise _UsageError(f"--worker-id: {args.worker_id[:70]!r}: expected letters, digits, "
                          "'_', '.', '-' (at most 64)")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        args = _parser().parse_args(argv)
        _check_files(args)
    except _UsageError as exc:
        print(f"sync.central: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        catalogue = open_catalogue(args.catalogue or str(args.dir / "catalogue.db"))
        store = CentralStore(args.dir, args.devices, load_or_create_signing_key(args.signing_key),
                             catalogue=catalogue, worker_id=args.worker_id)
    except (OSError, KeyFileError, CatalogueError) as exc:
        print(f"sync.central: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    client = CentralClient(store, args.host, args.port, args.ca, args.cert, args.key,
                           client_id=args.worker_id, share_group=args.share_group)
    return serve(client, None)


def main_config(path: Path) -> int:
    """`edge-recorder central ingest --config FILE`: one worker from the TOML file.

    Errors in the file or its paths raise ConfigError/KeyFileError/CatalogueError (one
    line each, exit 1, from the CLI).
    """
    from sync.central.config import check_files, load_central_config

    config = load_central_config(path)
    check_files(config)
    assert config.broker is not None
    store = CentralStore(Path(config.store.objects_dir), Path(config.store.devices_dir),
                         load_or_create_signing_key(Path(config.store.signing_key)),
                         catalogue=open_catalogue(config.catalogue_url),
                         worker_id=config.worker.id)
    broker = config.broker
    client = CentralClient(store, broker.host, broker.port, Path(broker.ca),
                           Path(broker.cert), Path(broker.key), client_id=config.worker.id,
                           share_group=config.worker.share_group)
    return serve(client, config.worker.retention_interval_s)


def serve(client: CentralClient, retention_interval_s: float | None) -> int:
    """Run ``client`` until SIGTERM/SIGINT, applying retention every interval."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _n, _f: stop.set())
    client.start()
    if retention_interval_s is not None:
        threading.Thread(target=retention_loop, args=(client.store, retention_interval_s, stop),
                         name="retention", daemon=True).start()
    stop.wait()
    client.stop()
    client.store.close()
    return 0


def retention_loop(store: CentralStore, interval_s: float, stop: threading.Event) -> None:
    """apply_retention now and every ``interval_s`` until ``stop`` (several workers may
    run it: erasing is idempotent)."""
    while True:
        try:
            erased = apply_retention(store)
            if erased:
                log.info("retention: %d recording(s) erased", len(erased))
        except Exception:
            log.exception("retention run failed; next in %.0f s", interval_s)
        if stop.wait(interval_s):
            return


if __name__ == "__main__":
    sys.exit(main())
