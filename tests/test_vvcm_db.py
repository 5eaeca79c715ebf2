"""The cluster database: generations, transactions, concurrent writers, deterministic VMs."""

from __future__ import annotations

import dataclasses
import ipaddress
import sqlite3
import subprocess
import sys
import threading

import pytest
from virtualinux.vvcm import changes, inventory
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.errors import DatabaseBusy, VlxError
from virtualinux.vvcm.model import Node, VirtualCluster, Volume

from .conftest import EXAMPLE


def imported(db: Database):
    parsed = inventory.load(EXAMPLE)
    return db.update("db import", "test", lambda c: inventory.apply(c, parsed, "test"))


def node(name: str, last: int) -> Node:
    return Node(name=name, mac=f"52:54:00:00:01:{last:02x}",
                ip=ipaddress.IPv4Address(f"198.18.0.{last}"), cpus=2, memory=1024)


def test_every_change_bumps_the_generation_once(db):
    assert db.generation() == 0
    assert imported(db).generation == 1
    db.update("node add", "node5", lambda c: changes.add_node(c, node("node5", 15)))
    assert db.generation() == 2
    vc = VirtualCluster(name="blue", vms=2, vcpus=1, memory=128,
                        cidr=ipaddress.IPv4Network("198.19.8.0/24"))
    db.update("vc define", "blue", lambda c: changes.define_vc(c, vc))
    assert db.generation() == 3
    db.update("vc remove", "blue", lambda c: changes.remove_vc(c, "blue"))
    db.update("node remove", "node5", lambda c: changes.remove_node(c, "node5"))
    assert db.generation() == 5
    assert [c.generation for c in db.changes()] == [0, 1, 2, 3, 4, 5]
    assert [c.action for c in db.changes()][-2:] == ["vc remove", "node remove"]


def test_a_change_that_changes_nothing_keeps_the_generation(db):
    imported(db)
    db.update("noop", "", lambda c: c)
    assert db.generation() == 1


def test_a_failed_change_leaves_the_database_as_it_was(db, db_path):
    imported(db)
    before = db_path.read_bytes()

    def half_then_fail(cluster):
        cluster = changes.add_node(cluster, node("node5", 15))
        same_ip = dataclasses.replace(node("node6", 16), ip=ipaddress.IPv4Address("198.18.0.15"))
        return changes.add_node(cluster, same_ip)

    with pytest.raises(VlxError, match="duplicate cluster IP 198.18.0.15"):
        db.update("node add", "two", half_then_fail)
    assert db_path.read_bytes() == before
    assert db.generation() == 1


def test_load_gives_back_what_was_stored(db):
    stored = imported(db)
    golden = Volume(name="node-golden", kind="golden", backend="reflink", path="/p/g", size=1)
    stored = db.update("volume", "g", lambda c: changes.put_volumes(c, [golden]))
    assert db.load() == stored
    assert db.load().volume("node-golden") == golden


def test_vms_get_the_same_macs_and_ips_in_two_independent_databases(tmp_path):
    first = imported(Database.create(tmp_path / "a.db"))
    second = imported(Database.create(tmp_path / "b.db"))
    assert first.vms == second.vms
    for vm in first.vms:
        octet = int(vm.mac[:2], 16)
        assert octet & 0x02 and not octet & 0x01, f"{vm.mac} is not local unicast"
    green = [str(vm.ip) for vm in first.vms_of("green")]
    assert green == ["198.19.3.1", "198.19.3.2", "198.19.3.3", "198.19.3.4"]


def test_placement_spreads_vcs_and_respects_the_overcommit_ratio(db):
    cluster = imported(db)
    for vc in cluster.vcs:
        nodes = [vm.node for vm in cluster.vms_of(vc.name)]
        assert len(set(nodes)) == min(len(nodes), len(cluster.nodes)), (vc.name, nodes)
    for n in cluster.nodes:
        vcpus = sum(cluster.vc(vm.vc).vcpus for vm in cluster.vms_on(n.name))
        assert vcpus <= n.cpus * cluster.settings.cpu_overcommit


def test_a_vc_that_does_not_fit_is_refused_and_nothing_is_placed(db):
    imported(db)
    huge = VirtualCluster(name="huge", vms=5, vcpus=8, memory=128,
                          cidr=ipaddress.IPv4Network("198.19.9.0/24"))
    with pytest.raises(VlxError, match="does not fit"):
        db.update("vc define", "huge", lambda c: changes.define_vc(c, huge))
    assert [vc.name for vc in db.load().vcs] == ["green", "tan", "pink"]
    assert db.generation() == 1


def test_overcommit_ratio_is_configurable(db):
    cluster = imported(db)
    lower = dataclasses.replace(cluster.settings, cpu_overcommit=1.0)
    with pytest.raises(VlxError, match="over cpu_overcommit 1"):
        db.update("settings", "", lambda c: changes.set_settings(c, lower))


def test_a_second_writer_waits_for_the_first(db, db_path):
    imported(db)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    # The change function runs only once the writer holds the database: that is the event.
    holding = threading.Event()

    def change(cluster):
        holding.set()
        return changes.add_node(cluster, node("node5", 15))
    writer = threading.Thread(target=db.update, args=("node add", "node5", change))
    writer.start()
    try:
        # While the first writer holds it the second never gets in (a writer that did not
        # wait would be in within milliseconds; a slow machine can only make this pass).
        assert not holding.wait(0.5)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert holding.wait(30), "the second writer never got in after the first committed"
    writer.join(30)
    assert db.load().node("node5").ip == ipaddress.IPv4Address("198.18.0.15")


def test_a_writer_that_cannot_wait_longer_fails_cleanly(db, db_path):
    imported(db)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        impatient = Database(db_path, busy_timeout=0.3)
        with pytest.raises(DatabaseBusy, match="nothing was changed"):
            impatient.update("node add", "n", lambda c: changes.add_node(c, node("node5", 15)))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert db.generation() == 1


def test_concurrent_writers_in_two_processes_lose_nothing(db, db_path):
    imported(db)
    script = (
        "import ipaddress, sys\n"
        "from virtualinux.vvcm import changes\n"
        "from virtualinux.vvcm.db import Database\n"
        "from virtualinux.vvcm.model import Node\n"
        "db = Database(sys.argv[1])\n"
        "base = int(sys.argv[2])\n"
        "for i in range(base, base + 15):\n"
        "    n = Node(name=f'n{i}', mac=f'52:54:00:00:02:{i:02x}',\n"
        "             ip=ipaddress.IPv4Address(f'198.18.0.{i}'), cpus=1, memory=512)\n"
        "    db.update('node add', n.name, lambda c, n=n: changes.add_node(c, n))\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(db_path), str(base)])
               for base in (20, 40)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    cluster = db.load()
    assert len(cluster.nodes) == 4 + 30
    assert cluster.generation == 1 + 30


def test_a_file_that_is_not_a_database_gives_a_clear_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite at all, just text " * 100)
    with pytest.raises(VlxError, match="not a virtualinux database"):
        Database(junk).load()
    assert junk.read_text().startswith("not sqlite")


def test_a_missing_database_says_how_to_make_one(tmp_path):
    with pytest.raises(VlxError, match="vlx db init"):
        Database(tmp_path / "none.db").load()


def test_init_refuses_to_overwrite_without_force(db, db_path):
    imported(db)
    with pytest.raises(VlxError, match="exists already"):
        Database.create(db_path)
    assert db.generation() == 1
    assert Database.create(db_path, force=True).generation() == 0
