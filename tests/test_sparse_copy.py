"""Backups read only what a disk holds: data extents by SEEK_DATA/SEEK_HOLE, a checksum that
does not depend on how sparse a copy is, progress for a person, warnings where a copy may not
be consistent or a volume may outgrow its pool."""

from __future__ import annotations

import dataclasses
import io
import os

import pytest
from virtualinux.storage import backup, volumes
from virtualinux.storage.backend import copy_sparse, data_extents, sparse_sha256
from virtualinux.vvcm import changes
from virtualinux.vvcm.cli.common import ProgressLine
from virtualinux.vvcm.db import Database

from .conftest import EXAMPLE, vlx

MIB = 1 << 20
GIB = 1 << 30


def sparse_file(path, size, pieces):
    with open(path, "wb") as out:
        out.truncate(size)
        for offset, data in pieces:
            out.seek(offset)
            out.write(data)
    return path


@pytest.fixture
def big_sparse(tmp_path):
    path = sparse_file(tmp_path / "disk.raw", 8 * GIB,
                       [(GIB, os.urandom(2 * MIB)), (5 * GIB + 12345, b"tail data")])
    with open(path, "rb") as handle:
        extents = list(data_extents(handle.fileno(), 8 * GIB))
    if sum(length for _, length in extents) >= GIB:
        pytest.skip("this file system does not report holes (SEEK_HOLE)")
    return path


def test_copy_reads_only_the_data_extents_and_writes_the_same_bytes(big_sparse, tmp_path):
    seen = []
    target = tmp_path / "copy.raw"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 8 * GIB)
        copy_sparse(big_sparse, fd, 8 * GIB, lambda done, total: seen.append((done, total)))
    finally:
        os.close(fd)
    total = seen[0][1]
    assert total < 8 * MIB                     # 8 GiB of holes were never read
    assert seen[-1] == (total, total) and seen[0] == (0, total)
    with open(big_sparse, "rb") as a, open(target, "rb") as b:
        for offset, length in ((GIB, 2 * MIB), (5 * GIB + 12345, 9)):
            assert os.pread(a.fileno(), length, offset) == os.pread(b.fileno(), length, offset)
    assert os.stat(target).st_blocks * 512 < 8 * MIB
    assert sparse_sha256(target) == sparse_sha256(big_sparse)


def test_sparse_checksum_is_the_same_for_holes_and_written_zeros(tmp_path):
    data = bytes(3 * MIB) + b"x" * 100 + bytes(MIB)
    dense = tmp_path / "dense"
    dense.write_bytes(data)
    sparse = sparse_file(tmp_path / "sparse", len(data), [(3 * MIB, b"x" * 100)])
    assert sparse_sha256(dense) == sparse_sha256(sparse)
    changed = sparse_file(tmp_path / "changed", len(data), [(3 * MIB, b"x" * 99 + b"y")])
    assert sparse_sha256(changed) != sparse_sha256(sparse)
    longer = sparse_file(tmp_path / "longer", len(data) + 1, [(3 * MIB, b"x" * 100)])
    assert sparse_sha256(longer) != sparse_sha256(sparse)


def test_progress_is_drawn_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter([0.0, 2.0, 4.0]).__next__
    screen = Terminal()
    progress = ProgressLine(screen, clock)
    progress("green-1-disk", 0, 40 * MIB)
    progress("green-1-disk", 20 * MIB, 40 * MIB)
    assert screen.getvalue().endswith(
        "green-1-disk: 20.0 MiB / 40.0 MiB of data (50%), 10.0 MiB/s, ETA 0:02")
    progress("green-1-disk", 40 * MIB, 40 * MIB)
    assert screen.getvalue().endswith("(100%), 10.0 MiB/s, done\n")
    quiet = io.StringIO()
    ProgressLine(quiet)("green-1-disk", 1, 2)
    assert quiet.getvalue() == ""


@pytest.fixture
def qcow2_cluster(db_path, tmp_path, monkeypatch, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    monkeypatch.setenv("VLX_POOL", str(pool))
    monkeypatch.setenv("VLX_STORAGE_STATE", str(tmp_path / "state"))
    (tmp_path / "golden.raw").write_bytes(os.urandom(4 * MIB))
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    assert vlx(capsys, "volume", "golden", "add", "guest", "--from",
               str(tmp_path / "golden.raw"), "--backend", "qcow2")[0] == 0
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:tan")[0] == 0
    return Database(db_path)


def test_backup_of_an_exported_disk_warns(qcow2_cluster, tmp_path):
    db = qcow2_cluster
    disk = db.load().volume("tan-1-disk")
    # Recorded as exported (as a reflink disk would be); the copy itself is the same.
    db.update("test", "export", lambda c: changes.put_volumes(c, [dataclasses.replace(
        disk, iqn="iqn.2026-11.org.virtualinux:vlxlab.tan-1-disk", portal="198.18.0.11:3260")]))
    warnings, progress = [], []
    manifest = backup.backup_vc(db, "tan", tmp_path / "backup", warn=warnings.append,
                                progress=lambda *seen: progress.append(seen))
    assert warnings == ["volume tan-1-disk is exported on 198.18.0.11:3260: if tan-1 is "
                        "running, its copy may not be consistent (stop it, or unexport first)"]
    assert manifest["format"] == 2 and all("sparse_sha256" in v for v in manifest["volumes"])
    backup.verify(tmp_path / "backup", manifest)


def test_format_1_backups_still_verify(qcow2_cluster, tmp_path):
    from virtualinux.vvcm.host import sha256_file

    manifest = backup.backup_vc(qcow2_cluster, "tan", tmp_path / "backup")
    for entry in manifest["volumes"]:
        del entry["sparse_sha256"]
        entry["sha256"] = sha256_file(tmp_path / "backup" / entry["file"])
    backup.verify(tmp_path / "backup", {**manifest, "format": 1})
    manifest["volumes"][0]["sha256"] = "0" * 64
    with pytest.raises(backup.VlxError, match="does not match"):
        backup.verify(tmp_path / "backup", manifest)


def test_growing_beyond_the_pools_free_space_warns(qcow2_cluster, capsys):
    volume = qcow2_cluster.load().volume("tan-1-disk")
    assert volumes.grow_warning(volume, volume.size + MIB) is None
    code, _, err = vlx(capsys, "volume", "grow", "tan-1-disk", "+1000TiB")
    assert code == 0
    assert err.startswith("vlx: warning: tan-1-disk grown to 1000 TiB could hold")
    assert "free: writing it full would run out of space" in err


def test_changed_chunks_covers_data_of_either_side_and_nothing_else(tmp_path):
    from virtualinux.storage.backend import CHUNK, changed_chunks

    size = 64 * CHUNK
    same = os.urandom(100)
    golden = sparse_file(tmp_path / "golden", 8 * CHUNK,      # shorter: grown since
                         [(0, same), (3 * CHUNK, b"golden data")])
    backup_file = sparse_file(tmp_path / "backup", size,
                              [(0, same), (40 * CHUNK + 5, b"new data")])
    changed = dict(changed_chunks(backup_file, golden, size))
    # Chunk 3: the golden's data is gone (zeros written); chunk 40: new data; chunk 0: equal.
    assert sorted(changed) == [3 * CHUNK, 40 * CHUNK]
    assert changed[3 * CHUNK] == bytes(CHUNK)
    assert changed[40 * CHUNK][5:13] == b"new data"
