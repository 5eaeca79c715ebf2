"""`vlx storage` without a running tgtd: arguments, state files and the messages an operator
sees (the lab tests run the real tgtd)."""

from __future__ import annotations

import json
import os
import socket

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
    assert code == 2 and [(r["portal"], r["pid"], r["state"], r["control_port"])
                          for r in rows] == [("198.18.0.11:3260", os.getpid(), "dead", 31999)]


def test_stop_without_a_tgtd_succeeds_and_bad_portals_are_refused(cluster, capsys):
    # Stopping what is stopped is done already (like `vlx lab down`): exit 0, and it says so.
    code, out, _ = vlx(capsys, "storage", "stop")
    assert code == 0 and out == "no tgtd runs for 198.18.0.11:3260: nothing to stop\n"
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


def test_listening_addresses_are_read_from_the_process_own_sockets():
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6, socket.socket() as idle:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        v6.bind(("::1", 0))
        v6.listen()
        idle.bind(("127.0.0.1", 0))   # bound, not listening: not offered to anyone
        expected = sorted([f"127.0.0.1:{v4.getsockname()[1]}", f"[::1]:{v6.getsockname()[1]}"])
        mine = tgt.listening_addresses(os.getpid())
        assert sorted(a for a in mine if a in expected or a.endswith(
            f":{idle.getsockname()[1]}")) == expected
