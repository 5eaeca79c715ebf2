"""Store URLs, the snapshot codec, local copies and the indexes, without etcd (the lab tests in
test_store_lab.py run the etcd store against real members)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import zlib

import pytest
from virtualinux.bench.scale import inventory as big_inventory
from virtualinux.vvcm import inventory, snapshot
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.fields import to_mapping
from virtualinux.vvcm.store import parse_url
from virtualinux.vvcm.store_sqlite import CopyMismatch, advance_copy, write_copy

from .conftest import EXAMPLE, vlx


@pytest.mark.parametrize("url, expected", [
    ("etcd://", "an empty endpoint is not HOST:PORT"),
    ("etcd://10.0.0.1", "'10.0.0.1' is not HOST:PORT"),
    ("etcd://a:1,b:x", "'b:x' is not HOST:PORT"),
    ("etcd://a:70000", "'a:70000' is not HOST:PORT"),
    ("sqlite:", "name the file"),
    ("mysql://x", "is not a store URL: use sqlite:PATH or etcd://"),
])
def test_a_malformed_store_url_is_one_line_and_exit_2(capsys, url, expected):
    code, out, err = vlx(capsys, "--store", url, "db", "show")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err and err.startswith("vlx: error: --store")


def test_store_urls_name_their_endpoints():
    url = parse_url("etcd://198.18.0.11:2379,198.18.0.12:2379")
    assert url.endpoints == (("198.18.0.11", 2379), ("198.18.0.12", 2379))
    assert str(url) == "etcd://198.18.0.11:2379,198.18.0.12:2379"
    assert str(parse_url("sqlite:/tmp/x.db").path) == "/tmp/x.db"


def test_an_unreachable_etcd_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("VLX_STORE_TIMEOUT", "2")
    # Port 1 on loopback: refused at once, no traffic leaves the machine.
    code, _, err = vlx(capsys, "--store", "etcd://127.0.0.1:1", "db", "show")
    assert code == 2 and err.count("\n") == 1
    assert "etcd://127.0.0.1:1 is unreachable or has no quorum (127.0.0.1:1: connection " \
           "refused)" in err


def test_db_and_store_together_are_refused(capsys, tmp_path):
    code, _, err = vlx(capsys, "--db", str(tmp_path / "a.db"), "--store",
                       f"sqlite:{tmp_path / 'b.db'}", "db", "show")
    assert code == 2 and "not both" in err


def test_a_sqlite_store_url_is_the_same_database_as_db(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("VLX_DB", raising=False)
    monkeypatch.setenv("VLX_STORE", f"sqlite:{tmp_path / 'c.db'}")
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    assert Database(tmp_path / "c.db").generation() == 1


def test_a_snapshot_decodes_to_the_same_cluster(db):
    cluster = db.update("db import", "t",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    assert snapshot.decode(snapshot.encode(cluster), "test") == cluster


def test_a_snapshot_reuses_the_text_of_unchanged_items_and_never_of_changed_ones(db):
    cluster = db.update("db import", "t",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    whole = {"schema": 1, "generation": cluster.generation,
             "settings": to_mapping(cluster.settings),
             "nodes": [to_mapping(n) for n in cluster.nodes],
             "vcs": [to_mapping(vc) for vc in cluster.vcs],
             "vms": [[vm.name, vm.vc, vm.index, vm.node, vm.mac, str(vm.ip), vm.volume]
                     for vm in cluster.vms],
             "volumes": [to_mapping(v) for v in cluster.volumes],
             "credentials": [[c.owner, c.username, c.secret] for c in cluster.credentials]}
    first = snapshot.encode(cluster)
    assert zlib.decompress(first) == json.dumps(whole, separators=(",", ":")).encode()
    assert snapshot.encode(cluster) == first                       # from the kept texts
    changed = dataclasses.replace(cluster, nodes=(dataclasses.replace(cluster.nodes[0],
                                                                      cpus=64),
                                                  *cluster.nodes[1:]))
    assert snapshot.decode(snapshot.encode(changed), "test").nodes[0].cpus == 64


@pytest.mark.parametrize("blob, expected", [
    (b"garbage", "does not decode"),
    (__import__("zlib").compress(b'{"schema": 99}'), "snapshot schema 99"),
    (__import__("zlib").compress(b'{"schema": 1, "generation": 1}'), "broken field"),
])
def test_a_bad_snapshot_is_refused_with_a_reason(blob, expected):
    with pytest.raises(VlxError, match=expected):
        snapshot.decode(blob, "test")


def test_a_local_copy_is_written_whole_and_replaces_the_old_one(db, tmp_path):
    cluster = db.update("db import", "t",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    path = tmp_path / "copy.db"
    path.write_bytes(b"an older, broken copy")
    write_copy(path, cluster, db.changes(None))
    copy = Database(path)
    assert copy.load() == cluster
    assert [c.generation for c in copy.changes(None)] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.db", "copy.db"]


def test_a_local_copy_of_a_newer_schema_is_refused(db, tmp_path):
    with sqlite3.connect(db.path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(VlxError, match="schema version 99"):
        Database(db.path).load()


LOCAL_COPY_WITHOUT_CLIENT = """
import json, sys
from pathlib import Path
from virtualinux.vvcm.replica_copy import ReplicaCopy
from virtualinux.vvcm.store import parse_url
copy = ReplicaCopy(parse_url("etcd://198.18.0.1:2379"), Path(sys.argv[1]))
usable = copy.open_local()
print(json.dumps({"usable": usable, "generation": copy.generation,
                  "reason": copy.rebuilt_reason, "url": copy.status()["url"],
                  "client_imported": "etcd3gw" in sys.modules or "requests" in sys.modules}))
"""


def open_local_copy(path) -> dict:
    result = subprocess.run([sys.executable, "-c", LOCAL_COPY_WITHOUT_CLIENT, str(path)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_a_good_local_copy_is_served_before_the_store_client_is_imported(db, tmp_path):
    cluster = db.update("db import", "t",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    path = tmp_path / "copy.db"
    write_copy(path, cluster, db.changes(None))
    assert open_local_copy(path) == {"usable": True, "generation": cluster.generation,
                                     "reason": None, "url": "etcd://198.18.0.1:2379",
                                     "client_imported": False}


def test_a_missing_or_spoiled_local_copy_is_not_served_and_says_why(tmp_path):
    path = tmp_path / "copy.db"
    missing = open_local_copy(path)
    assert (missing["usable"], missing["reason"]) == (False, "none yet")
    path.write_bytes(b"not a database")
    spoiled = open_local_copy(path)
    assert spoiled["usable"] is False and "is not a virtualinux database" in spoiled["reason"]
    assert path.read_bytes() == b"not a database"      # left for prepare() to rebuild


def test_a_replica_copy_of_a_sqlite_url_is_refused():
    from virtualinux.vvcm.replica_copy import ReplicaCopy
    with pytest.raises(VlxError, match="not a replicated store"):
        ReplicaCopy(parse_url("sqlite:/tmp/x.db"), EXAMPLE)


def test_store_timing_settings_must_allow_an_election(db):
    cluster = db.update("db import", "t",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    assert (cluster.settings.store_heartbeat_ms, cluster.settings.store_election_ms) == \
        (100, 1000)
    from virtualinux.vvcm import changes
    with pytest.raises(VlxError, match="under 5 heartbeats"):
        changes.validated(dataclasses.replace(cluster, settings=dataclasses.replace(
            cluster.settings, store_heartbeat_ms=500)))


def test_a_big_inventory_error_still_names_the_entry_line(tmp_path):
    text = big_inventory(2000)
    # The last node takes the first node's MAC: found by the one whole validation.
    text = text.replace('mac = "52:54:00:00:07:cf"', 'mac = "52:54:00:00:00:00"')
    path = tmp_path / "big.toml"
    path.write_text(text)
    line = text.splitlines().index('name = "n1999"')   # 0-based: the header is the line above
    with pytest.raises(VlxError) as error:
        inventory.apply(__import__("virtualinux.vvcm.model", fromlist=["Cluster"]).Cluster(
            0, None), inventory.load(path), str(path))
    assert str(error.value).startswith(f"{path}:{line}: [[node]] #2000 (n1999): duplicate MAC")


def test_cluster_lookups_use_the_indexes(db):
    cluster = db.update("db import", "t",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    assert cluster.vc("green").name == "green"
    assert [vm.name for vm in cluster.vms_of("green")] == [f"green-{i}" for i in range(1, 5)]
    assert all(vm.node == "node1" for vm in cluster.vms_on("node1"))
    assert cluster.volumes_owned_by("node1") == ()
    with pytest.raises(VlxError, match="no virtual cluster named 'x'"):
        cluster.vc("x")
    with pytest.raises(VlxError, match="no volume named 'x'"):
        cluster.volume("x")


ADVANCE = """
import sys
from pathlib import Path
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.store_sqlite import advance_copy
old, new = Database(sys.argv[2]).load(), Database(sys.argv[3]).load()
advance_copy(Path(sys.argv[1]), old, new, Database(sys.argv[3]).changes(None), 200, 5)
"""


def imported_then_changed(tmp_path, changes: int) -> tuple[Database, Database]:
    """A database at gen 1 (the example imported), and one taken `changes` generations on."""
    old = Database.create(tmp_path / "old.db")
    old.update("db import", "t", lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    new = Database.create(tmp_path / "new.db")
    new.update("db import", "t", lambda c: inventory.apply(c, inventory.load(EXAMPLE), "t"))
    for i in range(changes):
        new.update("node add", f"n{i}", lambda c, i=i: dataclasses.replace(
            c, nodes=(*c.nodes, dataclasses.replace(c.nodes[0], name=f"n{i}",
                                                    mac=f"52:54:00:ee:00:{i:02x}",
                                                    ip=c.nodes[0].ip + 100 + i))))
    return old, new


def test_a_local_copy_advances_in_place_to_the_same_content_as_a_whole_copy(tmp_path):
    old, new = imported_then_changed(tmp_path, 3)
    path = tmp_path / "copy.db"
    write_copy(path, old.load(), old.changes(None))
    inode = path.stat().st_ino
    entries = [c for c in new.changes(None) if c.generation > 1]     # only what is new
    advance_copy(path, old.load(), new.load(), entries, keep=3, busy_timeout=5)
    assert path.stat().st_ino == inode                               # in place, not rewritten
    assert Database(path).load() == new.load()
    assert [c.generation for c in Database(path).changes(None)] == [2, 3, 4]   # newest 3 kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "new.db", "old.db"]


def test_a_local_copy_not_at_the_expected_generation_is_not_advanced(tmp_path):
    old, new = imported_then_changed(tmp_path, 1)
    path = tmp_path / "copy.db"
    write_copy(path, new.load(), new.changes(None))                  # gen 2, not 1
    with pytest.raises(CopyMismatch, match="at gen 2, not at gen 1"):
        advance_copy(path, old.load(), new.load(), [], keep=200, busy_timeout=5)
    write_copy(path, old.load(), old.changes(None))
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(VlxError, match="schema version 99"):
        advance_copy(path, old.load(), new.load(), [], keep=200, busy_timeout=5)


def test_a_copy_killed_mid_advance_still_holds_the_old_generation_whole(tmp_path):
    old, new = imported_then_changed(tmp_path, 2)
    path = tmp_path / "copy.db"
    write_copy(path, old.load(), old.changes(None))
    writer = subprocess.Popen([sys.executable, "-c", ADVANCE, str(path), str(old.path),
                               str(new.path)], stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, VLX_STORE_PAUSE_AT="copy-before-commit"))
    try:
        assert writer.stderr is not None
        assert "paused at copy-before-commit" in writer.stderr.readline()
        # Every row of the new generation is written, uncommitted, its journal beside it.
        assert (tmp_path / "copy.db-journal").exists()
    finally:
        writer.kill()
        writer.wait(10)
    assert Database(path).load() == old.load()                       # the journal rolled back
    assert [c.generation for c in Database(path).changes(None)] == [0, 1]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    advance_copy(path, old.load(), new.load(), new.changes(None), keep=200, busy_timeout=5)
    assert Database(path).load() == new.load()
