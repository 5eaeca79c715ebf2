"""`vlx volume` bookkeeping and its refusals, on the qcow2 backend (any file system, no root):
names come from the database, every fault is exit 2 with nothing touched."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from virtualinux.vvcm.db import Database

from .conftest import EXAMPLE, vlx

GOLDEN_SIZE = 4 << 20


@pytest.fixture
def pool(tmp_path, monkeypatch):
    path = tmp_path / "pool"
    path.mkdir()
    monkeypatch.setenv("VLX_POOL", str(path))
    monkeypatch.setenv("VLX_STORAGE_STATE", str(tmp_path / "state"))
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "golden.raw"
    path.write_bytes(os.urandom(GOLDEN_SIZE))
    return path


@pytest.fixture
def cluster(db_path, pool, image, capsys):
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    code, out, err = vlx(capsys, "volume", "golden", "add", "guest", "--from", str(image),
                         "--backend", "qcow2")
    assert code == 0, err
    return db_path


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def pool_files(pool) -> list[str]:
    return sorted(os.listdir(pool))


def test_snapshots_are_named_after_the_vms_the_database_maps_them_to(cluster, pool, capsys):
    code, out, err = vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:green")
    assert code == 0, err
    assert "made 4 snapshots of guest: green-1-disk .. green-4-disk" in out
    volumes = json.loads(vlx(capsys, "volume", "list", "--json")[1])
    assert [(v["name"], v["kind"], v.get("owner"), v.get("origin")) for v in volumes] == [
        ("guest", "golden", None, None)] + [
        (f"green-{i}-disk", "snapshot", f"green-{i}", "guest") for i in range(1, 5)]
    assert volumes[0]["snapshots"] == 4
    vc = json.loads(vlx(capsys, "vc", "show", "green", "--json")[1])
    assert [vm["volume"] for vm in vc["vms"]] == [f"green-{i}-disk" for i in range(1, 5)]
    overlay = pool / "green-1-disk.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == str(pool / "guest.img")
    assert info["virtual-size"] == GOLDEN_SIZE
    assert os.stat(overlay).st_size < 1 << 20


def test_count_takes_the_next_nodes_without_a_snapshot(cluster, capsys):
    assert vlx(capsys, "volume", "snapshot", "guest", "--count", "2")[0] == 0
    code, out, _ = vlx(capsys, "volume", "snapshot", "guest", "--count", "2")
    assert code == 0 and "node3-root .. node4-root" in out
    code, _, err = vlx(capsys, "volume", "snapshot", "guest", "--count", "1")
    assert code == 2 and "only 0 of the nodes have no snapshot of guest" in err


def test_name_clash_is_refused_and_nothing_is_made(cluster, pool, capsys):
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "node2")[0] == 0
    before = pool_files(pool)
    generation = Database(cluster).generation()
    code, _, err = vlx(capsys, "volume", "snapshot", "guest", "--for", "node1,node2")
    assert code == 2 and "a volume named node2-root exists already" in err
    # A stray file in the pool (not in the database) is a clash too.
    (pool / "node3-root.qcow2").write_bytes(b"someone else's")
    code, _, err = vlx(capsys, "volume", "snapshot", "guest", "--for", "node3")
    assert code == 2 and "exists already in the pool but not in the database" in err
    assert pool_files(pool) == sorted(before + ["node3-root.qcow2"])
    assert Database(cluster).generation() == generation


def test_golden_in_use_read_write_is_not_snapshotted(cluster, pool, capsys):
    with open(pool / "guest.img", "r+b"):
        code, _, err = vlx(capsys, "volume", "snapshot", "guest", "--count", "2")
    assert code == 2 and "in use read-write" in err
    assert pool_files(pool) == ["guest.img"]
    # Readers are fine (QEMU opens a backing file read-only).
    with open(pool / "guest.img", "rb"):
        assert vlx(capsys, "volume", "snapshot", "guest", "--count", "2")[0] == 0


def test_exported_volume_is_not_removed_until_unexported(cluster, pool, capsys):
    code, _, err = vlx(capsys, "volume", "snapshot", "guest", "--for", "node1",
                       "--suffix", "disk")
    assert code == 0, err
    # qcow2 overlays cannot be served by tgt: refused with the reason.
    code, _, err = vlx(capsys, "volume", "export", "node1-disk")
    assert code == 2 and "tgt cannot serve" in err
    assert json.loads(vlx(capsys, "volume", "show", "node1-disk", "--json")[1]).get(
        "iqn") is None


def test_remove_refusals_and_removal(cluster, pool, capsys):
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:tan")[0] == 0
    code, _, err = vlx(capsys, "volume", "remove", "guest")
    assert code == 2 and "are snapshots of it" in err
    code, _, err = vlx(capsys, "volume", "remove", "nosuch")
    assert code == 2 and "no volume named 'nosuch'" in err
    assert pool_files(pool) == ["guest.img", "tan-1-disk.qcow2", "tan-2-disk.qcow2"]
    code, out, _ = vlx(capsys, "volume", "remove", "guest", "--snapshots-of", "guest")
    assert code == 0 and "removed 3 volumes" in out
    assert pool_files(pool) == []
    vc = json.loads(vlx(capsys, "vc", "show", "tan", "--json")[1])
    assert [vm["volume"] for vm in vc["vms"]] == [None, None]


def test_grow_and_refusal_to_shrink(cluster, pool, capsys):
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "node1")[0] == 0
    code, out, _ = vlx(capsys, "volume", "grow", "node1-root", "+4MiB")
    assert code == 0 and "8 MiB" in out
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(pool / "node1-root.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 8 << 20
    code, _, err = vlx(capsys, "volume", "grow", "node1-root", "1MiB")
    assert code == 2 and "shrinking" in err


def test_argument_errors(cluster, image, capsys):
    for argv, message in [
        (["volume", "snapshot", "guest"], "--count N"),
        (["volume", "snapshot", "guest", "--count", "0"], "at least 1"),
        (["volume", "snapshot", "guest", "--for", "node9"], "neither a node nor a VM"),
        (["volume", "snapshot", "guest", "--for", "vc:blue"], "no virtual cluster"),
        (["volume", "snapshot", "nosuch", "--count", "1"], "no volume named"),
        (["volume", "golden", "add", "guest", "--from", str(image)], "exists already"),
        (["volume", "golden", "add", "g2", "--from", "/nonexistent"], "cannot read image"),
        (["volume", "golden", "add", "Bad_Name", "--from", str(image)], "not a host name"),
        (["volume", "grow", "guest", "lots"], "size 'lots'"),
        (["volume", "remove"], "name the volumes"),
    ]:
        code, _, err = vlx(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)


def test_reflink_pool_on_a_file_system_without_reflink_is_refused(cluster, tmp_path, image,
                                                                   capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = vlx(capsys, "volume", "golden", "add", "node", "--from", str(image),
                       "--pool", str(plain))
    assert code == 2 and "cannot make reflink clones" in err and "storage pool create" in err
    assert os.listdir(plain) == []


def test_qcow2_vc_backup_and_restore(cluster, pool, tmp_path, capsys):
    from virtualinux.storage import backup

    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:tan")[0] == 0
    written = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 65536 65536",
                              str(pool / "tan-2-disk.qcow2")], capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    db = Database(cluster)
    before = db.load()
    manifest = backup.backup_vc(db, "tan", tmp_path / "backup")
    raw = (tmp_path / "backup" / "tan-2-disk.raw").read_bytes()
    assert raw[65536:131072] == b"\x33" * 65536 and len(raw) == GOLDEN_SIZE
    assert [entry["file"] for entry in manifest["volumes"]] == ["tan-1-disk.raw",
                                                                "tan-2-disk.raw"]
    code, _, err = vlx(capsys, "volume", "remove", "tan-1-disk", "tan-2-disk")
    assert code == 0, err
    assert vlx(capsys, "vc", "remove", "tan")[0] == 0

    backup.restore_vc(db, tmp_path / "backup")
    after = db.load()
    assert after.vms_of("tan") == before.vms_of("tan")
    assert after.volume("tan-2-disk") == before.volume("tan-2-disk")
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                               str(pool / "tan-2-disk.qcow2"),
                               str(tmp_path / "backup" / "tan-2-disk.raw")],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    # Only the written chunk came back into the overlay; the rest is the golden's again.
    assert allocated(pool / "tan-1-disk.qcow2") < 512 * 1024
    assert allocated(pool / "tan-2-disk.qcow2") < 512 * 1024 + (1 << 20)

    # Restoring over a VC that exists changes nothing.
    generation = db.generation()
    with pytest.raises(backup.VlxError, match="exists already"):
        backup.restore_vc(db, tmp_path / "backup")
    assert db.generation() == generation


@pytest.mark.parametrize("owner", [None, "pink-1"])
def test_renamed_restore_of_a_volume_of_no_vm_of_the_backup_is_refused(cluster, pool, tmp_path,
                                                                       capsys, owner):
    """A damaged manifest (a volume without owner, or owned by a VM the backup does not
    hold) is one clear error, not a traceback, and nothing is restored."""
    from virtualinux.storage import backup

    db = Database(cluster)
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:tan")[0] == 0
    backup.backup_vc(db, "tan", tmp_path / "b")
    path = tmp_path / "b" / backup.MANIFEST
    manifest = json.loads(path.read_text())
    if owner is None:
        del manifest["volumes"][0]["owner"]
    else:
        manifest["volumes"][0]["owner"] = owner
    path.write_text(json.dumps(manifest))
    generation, files = db.generation(), pool_files(pool)
    with pytest.raises(backup.VlxError, match="belongs to no VM of it.*damaged"):
        backup.restore_vc(db, tmp_path / "b", new_name="copy")
    assert db.generation() == generation and pool_files(pool) == files


def test_backup_refuses_a_non_empty_directory_and_a_missing_vc(cluster, tmp_path):
    from virtualinux.storage import backup

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(backup.VlxError, match="not empty"):
        backup.backup_vc(Database(cluster), "green", tmp_path / "full")
    with pytest.raises(backup.VlxError, match="no virtual cluster"):
        backup.backup_vc(Database(cluster), "blue", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(backup.VlxError, match="no vc.json"):
        backup.restore_vc(Database(cluster), tmp_path / "full")


def test_vlx_vc_backup_and_restore(cluster, pool, tmp_path, capsys):
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:green")[0] == 0
    code, out, err = vlx(capsys, "vc", "backup", "green", str(tmp_path / "b"))
    assert code == 0, err
    assert f"backed up green: 4 VMs, 4 volumes to {tmp_path / 'b'}" in out
    code, _, err = vlx(capsys, "vc", "backup", "green", str(tmp_path / "b"))
    assert code == 2 and "not empty" in err
    names = [f"green-{i}-disk" for i in range(1, 5)]
    assert vlx(capsys, "volume", "remove", *names)[0] == 0
    assert vlx(capsys, "vc", "remove", "green")[0] == 0
    code, out, err = vlx(capsys, "vc", "restore", str(tmp_path / "b"))
    assert code == 0 and "restored green" in out, err
    vc = json.loads(vlx(capsys, "vc", "show", "green", "--json")[1])
    assert [vm["volume"] for vm in vc["vms"]] == names
    code, _, err = vlx(capsys, "vc", "restore", str(tmp_path / "nowhere"))
    assert code == 2 and "no vc.json" in err


def test_remove_for_a_vc_and_vc_remove_with_its_volumes(cluster, pool, capsys):
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:tan")[0] == 0
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:pink")[0] == 0
    code, out, _ = vlx(capsys, "volume", "remove", "--for", "vc:tan")
    assert code == 0 and out == "removed 2 volumes: tan-1-disk, tan-2-disk\n"
    code, out, _ = vlx(capsys, "volume", "remove", "--for", "vc:tan")   # nothing left: done
    assert code == 0 and out == "no volume matches: nothing to remove\n"
    code, _, err = vlx(capsys, "vc", "remove", "pink")
    assert code == 2 and "`vlx vc remove pink --volumes` does both" in err
    code, out, _ = vlx(capsys, "vc", "remove", "pink", "--volumes")
    assert code == 0 and out.splitlines()[0].startswith("removed 4 volumes: pink-1-disk")
    assert pool_files(pool) == ["guest.img"]
    assert [vc["name"] for vc in json.loads(vlx(capsys, "vc", "list", "--json")[1])] == [
        "green", "tan"]


def test_one_volume_is_counted_in_the_singular(cluster, pool, capsys):
    code, out, _ = vlx(capsys, "volume", "snapshot", "guest", "--for", "node4")
    assert out == "made 1 snapshot of guest: node4-root\n"
    code, out, _ = vlx(capsys, "volume", "remove", "node4-root")
    assert out == "removed 1 volume: node4-root\n"


def test_show_gives_sizes_as_list_does_and_list_order_is_stable(cluster, pool, capsys):
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "node1,node2")[0] == 0
    listing = vlx(capsys, "volume", "list")[1]
    assert "4 MiB" in listing
    shown = vlx(capsys, "volume", "show", "guest")[1]
    assert "size:       4 MiB\n" in shown
    assert json.loads(vlx(capsys, "volume", "show", "guest", "--json")[1])["size"] == 4 << 20
    assert vlx(capsys, "volume", "grow", "node1-root", "+4MiB")[0] == 0   # a replaced record
    names = [line.split()[0] for line in vlx(capsys, "volume", "list")[1].splitlines()[1:]]
    assert names == ["guest", "node1-root", "node2-root"]


def test_snapshots_tgt_cannot_serve_are_not_made_when_asked_to_export(cluster, pool, capsys):
    code, _, err = vlx(capsys, "volume", "snapshot", "guest", "--for", "node1", "--export")
    assert code == 2 and "node1-root is a qcow2 overlay, which tgt cannot serve" in err
    assert pool_files(pool) == ["guest.img"]


def test_golden_add_into_a_missing_pool_says_how_to_make_one(cluster, tmp_path, image, capsys):
    missing = tmp_path / "no-such-pool"
    code, _, err = vlx(capsys, "volume", "golden", "add", "node", "--from", str(image),
                       "--pool", str(missing))
    assert code == 2 and f"pool {missing} does not exist" in err
    assert "`vlx storage pool create DIR --size 20GiB`" in err and "--backend qcow2" in err
    assert not missing.exists()
