"""`vlx vc restore --as NAME`: a backup restored beside its original (no root, qcow2 pool);
the live backups of running VMs are in test_vc_lab.py."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from virtualinux.vvcm.db import Database

from .conftest import EXAMPLE, vlx


@pytest.fixture
def tan_backup(db_path, tmp_path, monkeypatch, capsys):
    """The example cluster with VC tan's disks (one written to) backed up to tmp/b."""
    pool = tmp_path / "pool"
    pool.mkdir()
    monkeypatch.setenv("VLX_POOL", str(pool))
    golden = tmp_path / "golden.raw"
    golden.write_bytes(os.urandom(4 << 20))
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    assert vlx(capsys, "volume", "golden", "add", "guest", "--from", str(golden),
               "--backend", "qcow2")[0] == 0
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:tan")[0] == 0
    written = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 65536",
                              str(pool / "tan-2-disk.qcow2")], capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    code, _, err = vlx(capsys, "vc", "backup", "tan", str(tmp_path / "b"))
    assert code == 0, err
    return pool


def test_restore_as_a_new_name_sits_beside_the_original(tan_backup, tmp_path, capsys):
    code, out, err = vlx(capsys, "vc", "restore", str(tmp_path / "b"), "--as", "tan2",
                         "--cidr", "198.19.9.0/24")
    assert code == 0 and "restored tan2" in out, err
    vcs = {vc["name"]: vc for vc in json.loads(vlx(capsys, "vc", "list", "--json")[1])}
    assert vcs["tan2"]["cidr"] == "198.19.9.0/24"
    assert vcs["tan2"]["vxlan"] not in (None, vcs["tan"]["vxlan"])
    assert [(vm["name"], vm["volume"], vm["ip"]) for vm in vcs["tan2"]["vms"]] == [
        ("tan2-1", "tan2-1-disk", "198.19.9.1"), ("tan2-2", "tan2-2-disk", "198.19.9.2")]
    assert [vm["volume"] for vm in vcs["tan"]["vms"]] == ["tan-1-disk", "tan-2-disk"]
    same = subprocess.run(["qemu-img", "compare", str(tan_backup / "tan-2-disk.qcow2"),
                           str(tan_backup / "tan2-2-disk.qcow2")], capture_output=True,
                          text=True)
    assert same.returncode == 0, same.stdout + same.stderr


def test_restore_as_on_the_originals_network_is_refused_with_nothing_made(tan_backup, db_path,
                                                                          tmp_path, capsys):
    db = Database(db_path)
    generation = db.generation()
    files = sorted(os.listdir(tan_backup))
    code, _, err = vlx(capsys, "vc", "restore", str(tmp_path / "b"), "--as", "tan2")
    assert code == 2 and "overlaps" in err and len(err.strip().splitlines()) == 1
    assert db.generation() == generation and sorted(os.listdir(tan_backup)) == files
    code, _, err = vlx(capsys, "vc", "restore", str(tmp_path / "b"), "--cidr", "198.19.9.0/24")
    assert code == 2 and "--cidr goes with --as" in err


def test_incremental_backup_since_another_vcs_backup_is_refused(tan_backup, tmp_path, capsys):
    code, _, err = vlx(capsys, "vc", "backup", "green", str(tmp_path / "g"), "--since",
                       str(tmp_path / "b"))
    assert code == 2 and "is a backup of VC 'tan', not of green" in err
    assert not (tmp_path / "g").exists()
