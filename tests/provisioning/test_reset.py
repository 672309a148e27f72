"""`edge-recorder factory-reset`: refuses while a recording is not synced, wipes otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.clock import ManualClock
from firmware.catalogue import Catalogue
from firmware.config import load_config
from firmware.recorder import iso_utc

from .conftest import REPO, write_settings

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="factory-reset runs as root only")


def make_box(tmp: Path, synced: bool) -> Path:
    config_path = tmp / "config.toml"
    config_path.write_text(write_settings(tmp).read_text()
                           + f'\n[storage]\ndata_dir = "{tmp / "data"}"\n')
    config = load_config(config_path)
    clock = ManualClock()
    (config.data_dir / "keys").mkdir(parents=True)
    (config.data_dir / "keys" / "tls_p256.pem").write_text("key")
    cat = Catalogue(config.catalogue_path, clock=clock, device_id=config.device_id)
    with cat.transaction() as tx:
        call_id = tx.insert_call(line_id="line1", direction="inbound", state="ended",
                                 started_at=iso_utc(clock.wall()), started_wall=clock.wall(),
                                 wall_synced=1)
        tx.insert_recording(call_id=call_id, line_id="line1", path=str(tmp / "a.rec"),
                            codec="alaw", sample_rate=8000, state="complete",
                            sha256="ab" * 32, created_at=iso_utc(clock.wall()),
                            synced_at=iso_utc(clock.wall()) if synced else None)
    cat.close()
    return config_path


def reset(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", "factory-reset", "--config",
                           str(config), *extra], cwd=REPO, check=False, capture_output=True, text=True,
                          timeout=60)


def test_refuses_while_a_recording_is_unsynced(tmp_path: Path) -> None:
    config = make_box(tmp_path, synced=False)
    done = reset(config)
    assert done.returncode == 1
    assert "1 recording(s) not yet confirmed" in done.stderr
    assert config.exists() and (tmp_path / "data" / "keys" / "tls_p256.pem").exists()


def test_forced_reset_destroys_unsynced_loudly(tmp_path: Path) -> None:
    config = make_box(tmp_path, synced=False)
    done = reset(config, "--force-destroy-unsynced")
    assert done.returncode == 0, done.stderr
    assert "WARNING" in done.stderr and "1 unsynced recording(s) destroyed" in done.stdout
    assert not config.exists() and not (tmp_path / "data").exists()


def test_reset_wipes_keys_recordings_and_config_once_synced(tmp_path: Path) -> None:
    config = make_box(tmp_path, synced=True)
    done = reset(config)
    assert done.returncode == 0, done.stderr
    assert not config.exists() and not (tmp_path / "data").exists()


def test_reset_removes_the_managed_config_and_the_link_to_it(tmp_path: Path) -> None:
    """As provisioning leaves it: /etc's config.toml links to the state directory's copy."""
    managed = make_box(tmp_path, synced=True)
    link = tmp_path / "etc" / "config.toml"
    link.parent.mkdir()
    link.symlink_to(managed)
    done = reset(link)
    assert done.returncode == 0, done.stderr
    assert not link.is_symlink() and not managed.exists()
    assert not (tmp_path / "data").exists()
