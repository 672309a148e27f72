"""Physical factory reset (`edge-recorder factory-reset`, docs/PROVISIONING.md).

Run at the box (console or keyboard), as root: it wipes the keys, the recordings, the
catalogue, the provisioning state and the configuration, so the box is blank again and can
be provisioned anew. Recordings the central store has not confirmed (``synced_at`` empty)
would be lost for good: the reset refuses while any exists unless forced.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from firmware.config import Config

log = logging.getLogger(__name__)


class ResetError(Exception):
    """The reset was refused or failed (message names the cause)."""


@dataclass(frozen=True)
class ResetReport:
    removed: list[Path]
    unsynced_destroyed: list[str]


def unsynced_recordings(config: Config) -> list[str]:
    """Ids of recordings not deleted and not confirmed stored by the central store."""
    from firmware.catalogue import Catalogue, CatalogueError

    if not config.catalogue_path.exists():
        return []
    try:
        catalogue = Catalogue.read_only(config.catalogue_path)
    except CatalogueError as exc:
        raise ResetError(f"{config.catalogue_path}: cannot check what is synced: {exc}") from None
    try:
        return [row["id"] for row in catalogue.recordings()
                if not row.get("synced_at") and not row.get("deleted_at")]
    finally:
        catalogue.close()


def factory_reset(config: Config, config_path: Path, *, force_destroy_unsynced: bool = False,
                  ) -> ResetReport:
    """Wipe data_dir (keys, recordings, catalogue, provisioning state) and the config."""
    unsynced = unsynced_recordings(config)
    if unsynced and not force_destroy_unsynced:
        raise ResetError(f"{len(unsynced)} recording(s) not yet confirmed by the central store "
                         f"(first {unsynced[0]}); let sync finish, or pass "
                         "--force-destroy-unsynced to destroy them")
    if unsynced:
        log.warning("DESTROYING %d recording(s) the central store never confirmed: %s",
                    len(unsynced), ", ".join(unsynced))
    removed = []
    for path in (config.recordings_dir, config.data_dir):
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
    for path in dict.fromkeys((config_path.resolve(), config_path)):  # the managed copy
        if path.exists() or path.is_symlink():  # and the /etc link to it (dangling by now)
            path.unlink()
            removed.append(path)
    log.warning("factory reset: removed %s", ", ".join(map(str, removed)) or "nothing")
    return ResetReport(removed=removed, unsynced_destroyed=unsynced)
