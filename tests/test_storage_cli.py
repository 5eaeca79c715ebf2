"""`vlx storage` without a running tgtd: arguments, state files and the messages an operator
sees (the lab tests run the real tgtd)."""

from __future__ import annotations

import json
import os

import pytest
from virtualinux.storage import tgt

from .conftest import EXAMPLE, vlx


@pytest.fixture
def cluster(db_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLX_STORAGE_STATE", str(tmp_path / "state"))
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    return tmp_path / "state"


def test_status_lists_each_recorded_tgtd_and_nothing_more(cluster, capsys):
    code, out, _ = vlx(capsys, "storage", "status", "--json")
    assert code == 0 and json.loads(out) == []
    cluster.mkdir()
    # Recorded, but the pid is not a tgtd (this test process): listed, and listed as dead.
    tgt.state_file("198.18.0.11:3260", cluster).write_text(json.dumps(
        {"portal": "198.18.0.11:3260", "control_port": 31999, "pid": os.getpid()}))
    code, out, _ = vlx(capsys, "storage", "status", "--json")
    rows = json.loads(out)
    assert code == 2 and [(r["portal"], r["pid"], r["alive"], r["control_port"])
                          for r in rows] == [("198.18.0.11:3260", os.getpid(), False, 31999)]


def test_stop_without_a_tgtd_and_bad_portals_are_refused(cluster, capsys):
    code, _, err = vlx(capsys, "storage", "stop")
    assert code == 2 and "no tgtd was started for 198.18.0.11:3260" in err
    code, _, err = vlx(capsys, "storage", "serve", "--portal", "198.18.0.300")
    assert code == 2 and "portal '198.18.0.300'" in err


def test_a_dead_tgtd_in_the_state_file_is_reported(cluster, capsys):
    cluster.mkdir()
    # A pid that is certainly not tgtd: this test process.
    tgt.state_file("198.18.0.11:3260", cluster).write_text(json.dumps(
        {"portal": "198.18.0.11:3260", "control_port": 31999, "pid": os.getpid()}))
    code, out, err = vlx(capsys, "storage", "status")
    assert code == 2 and "has died" in err and "DEAD" in out
    with pytest.raises(tgt.TgtDown, match="has died"):
        tgt.running_daemon("198.18.0.11:3260", cluster)


def test_a_damaged_state_file_is_named(cluster, capsys):
    cluster.mkdir()
    path = tgt.state_file("198.18.0.11:3260", cluster)
    path.write_text("{not json")
    code, _, err = vlx(capsys, "storage", "status")
    assert code == 2 and str(path) in err and "damaged" in err


def test_default_portal_needs_a_storage_node(db_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLX_STORAGE_STATE", str(tmp_path / "state"))
    vlx(capsys, "db", "init")
    code, _, err = vlx(capsys, "storage", "stop")
    assert code == 2 and "no node has the storage role" in err
