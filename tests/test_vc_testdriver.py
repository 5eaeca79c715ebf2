"""The VC life cycle against libvirt's test driver (`test:///default`: the real libvirt API,
no QEMU), with each node's VC network built by pyroute2 in a namespace of its own.

Lab-marked because the networks need root and namespaces; no QEMU runs, each test takes a
second or two.
"""

from __future__ import annotations

import re
import subprocess

import libvirt
import pytest
from virtualinux.vvcm.virt import network
from virtualinux.vvcm.virt.connect import silence_libvirt
from virtualinux.vvcm.virt.lifecycle import find_domain

from .conftest import vlx

pytestmark = pytest.mark.lab
TEST_URI = "test:///default"


def inventory(netns_names: list[str], uri: str = TEST_URI) -> str:
    nodes = "".join(f"""
[[node]]
name = "node{i}"
mac = "52:54:00:00:00:{10 + i}"
ip = "198.18.0.{10 + i}"
cpus = 4
memory = "2GiB"
libvirt_uri = "{uri}"
netns = "{ns}"
""" for i, ns in enumerate(netns_names, start=1))
    return """
[cluster]
name = "vctest"
domain = "vc.lab"
cidr = "198.18.0.0/24"
gateway_vip = "198.18.0.254"
hypervisor = "qemu"
vm_log_dir = "LOGDIR"
""" + nodes


@pytest.fixture
def test_driver():
    """test:///default is one state per process: every domain a test made goes after it."""
    silence_libvirt()
    conn = libvirt.open(TEST_URI)
    before = set(conn.listDefinedDomains()) | {d.name() for d in conn.listAllDomains()}
    try:
        yield conn
    finally:
        for domain in conn.listAllDomains():
            if domain.name() not in before:
                if domain.isActive():
                    domain.destroy()
                domain.undefine()
        conn.close()


@pytest.fixture
def cluster(tmp_path, db, netns, capsys, test_driver):
    """Three nodes on the test driver, each with its own namespace, a qcow2 golden volume
    `guest`, and a VC `blue` of 2 VMs, on node1 and node2."""
    namespaces = [netns.namespace(f"n{i}") for i in (1, 2, 3)]
    text = inventory([ns.name for ns in namespaces]).replace("LOGDIR", str(tmp_path / "logs"))
    (tmp_path / "cluster.toml").write_text(text)
    assert vlx(capsys, "db", "import", str(tmp_path / "cluster.toml"))[0] == 0
    golden = tmp_path / "guest.raw"
    golden.write_bytes(b"\0" * (1 << 20))
    pool = tmp_path / "pool"
    pool.mkdir()
    assert vlx(capsys, "volume", "golden", "add", "guest", "--from", str(golden),
               "--backend", "qcow2", "--pool", str(pool))[0] == 0
    code, out, err = vlx(capsys, "vc", "define", "blue", "--vms", "2", "--vcpus", "1",
                         "--memory", "64MiB", "--cidr", "198.19.6.0/24")
    assert code == 0, err
    return {"namespaces": namespaces, "pool": pool, "conn": test_driver}


def plan_mtu(plan) -> dict[str, int]:
    out = subprocess.run(["ip", "-n", plan.netns, "-o", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return {name: int(mtu) for name, mtu in re.findall(r"^\d+: ([^:@]+)[^\n]* mtu (\d+)",
                                                          out, re.MULTILINE)
            if name.startswith("vlx")}


def plans(db, vc="blue"):
    cluster = db.load()
    return network.node_plans(cluster, vc, network.hosting_nodes(cluster, vc))


def test_create_start_stop_destroy(cluster, db, capsys):
    conn = cluster["conn"]
    code, out, err = vlx(capsys, "vc", "create", "blue")
    assert code == 0, err
    loaded = db.load()
    vms = loaded.vms_of("blue")
    assert {vm.node for vm in vms} == {"node1", "node2"}
    for vm in vms:
        domain = find_domain(conn, vm.name)
        assert domain is not None and not domain.isActive()
        assert vm.volume == f"{vm.name}-disk"
        assert (cluster["pool"] / f"{vm.name}-disk.qcow2").is_file()
        assert vm.mac in domain.XMLDesc()
    for plan in plans(db):
        assert network.devices_present(plan) == ["vlxbr100", "vlxvx100"]
        other = "198.18.0.12" if plan.node == "node1" else "198.18.0.11"
        assert network.peers_of(plan) == [other]
        mtu = plan_mtu(plan)
        assert mtu == {"vlxbr100": 1450, "vlxvx100": 1450}  # what the guests are given

    code, out, err = vlx(capsys, "vc", "start", "blue")
    assert code == 0, err
    assert "started 2 VMs" in out
    assert all(find_domain(conn, vm.name).isActive() for vm in vms)
    code, out, _ = vlx(capsys, "vc", "status", "blue", "--json")
    assert code == 0 and out.count('"state": "running"') == 2

    assert vlx(capsys, "vc", "start", "blue")[1].startswith("started 0 VMs")
    code, out, err = vlx(capsys, "vc", "stop", "blue", "--force")
    assert code == 0 and "stopped 2 VMs" in out, err
    assert not any(find_domain(conn, vm.name).isActive() for vm in vms)

    code, out, err = vlx(capsys, "vc", "destroy", "blue")
    assert code == 0, err
    assert all(find_domain(conn, vm.name) is None for vm in vms)
    assert all(network.devices_present(plan) == [] for plan in plans(db))
    assert db.load().volumes == (db.load().volume("guest"),)
    assert list(cluster["pool"].glob("*.qcow2")) == []
    # Destroying again finds nothing to do, and says so without failing.
    assert vlx(capsys, "vc", "destroy", "blue")[0] == 0


def test_create_twice_changes_nothing(cluster, db, capsys):
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    generation = db.generation()
    xml = {vm.name: find_domain(cluster["conn"], vm.name).XMLDesc()
           for vm in db.load().vms_of("blue")}
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    assert db.generation() == generation
    assert xml == {name: find_domain(cluster["conn"], name).XMLDesc() for name in xml}
    assert all("-disk.qcow2" in text for text in xml.values())
    assert vlx(capsys, "vc", "destroy", "blue", "--keep-volumes")[0] == 0
    assert len(db.load().volumes) == 3
    # Re-created from the kept volumes: no new disk is made.
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    assert len(db.load().volumes) == 3
    assert vlx(capsys, "vc", "destroy", "blue")[0] == 0


def test_failed_create_rolls_back_what_it_made(cluster, db, capsys):
    conn = cluster["conn"]
    # A foreign domain holds the name of blue-2 (another UUID): its define fails.
    conn.defineXML("<domain type='test'><name>blue-2</name><memory>65536</memory>"
                   "<os><type>hvm</type></os></domain>")
    code, out, err = vlx(capsys, "vc", "create", "blue")
    assert code == 2
    assert err.startswith("vlx: error: node node2") and "blue-2" in err
    assert len(err.strip().splitlines()) == 1
    assert find_domain(conn, "blue-1") is None
    assert all(network.devices_present(plan) == [] for plan in plans(db))
    assert [v.name for v in db.load().volumes] == ["guest"]
    assert list(cluster["pool"].glob("*.qcow2")) == []
    # With the clash gone, the same command completes.
    conn.lookupByName("blue-2").undefine()
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    assert all(find_domain(conn, vm.name) for vm in db.load().vms_of("blue"))
    assert vlx(capsys, "vc", "destroy", "blue")[0] == 0


def test_two_vcs_get_separate_networks(cluster, db, capsys):
    assert vlx(capsys, "vc", "define", "red", "--vms", "2", "--vcpus", "1", "--memory",
               "64MiB", "--cidr", "198.19.7.0/24")[0] == 0
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    assert vlx(capsys, "vc", "create", "red")[0] == 0
    assert [network.devices_present(plan) for plan in plans(db, "red")] == [
        ["vlxbr101", "vlxvx101"]] * 2
    assert vlx(capsys, "vc", "destroy", "red")[0] == 0
    # Removing red left blue's network alone.
    assert all(network.devices_present(plan) == ["vlxbr100", "vlxvx100"]
               for plan in plans(db))
    assert vlx(capsys, "vc", "destroy", "blue")[0] == 0


def test_start_before_create_names_the_missing_domain(cluster, capsys):
    code, _, err = vlx(capsys, "vc", "start", "blue")
    assert code == 2
    assert "blue-" in err and "vlx vc create blue" in err


def test_failed_migration_leaves_the_vm_and_the_networks_where_they_were(cluster, db, capsys):
    # The test driver cannot migrate: a real refusal from libvirt, after our network step.
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    assert vlx(capsys, "vc", "start", "blue")[0] == 0
    before = db.load()
    code, out, err = vlx(capsys, "vc", "migrate", "blue", "blue-1", "--to", "node3")
    assert code == 2
    assert err.startswith("vlx: error: migration of blue-1 to node3 failed, it stays on node1")
    assert db.generation() == before.generation
    assert find_domain(cluster["conn"], "blue-1").isActive()
    node3 = network.node_plans(before, "blue", ["node3"])[0]
    assert network.devices_present(node3) == []
    assert [network.peers_of(plan) for plan in plans(db)] == [["198.18.0.12"], ["198.18.0.11"]]
    assert vlx(capsys, "vc", "destroy", "blue")[0] == 0


@pytest.mark.parametrize("argv,message", [
    (("vc", "migrate", "blue", "blue-1", "--to", "node1"), "blue-1 is on node1 already"),
    (("vc", "migrate", "blue", "blue-9", "--to", "node2"), "VC blue has no VM named 'blue-9'"),
    (("vc", "migrate", "blue", "blue-1", "--to", "node9"), "no node named 'node9'"),
    (("vc", "create", "nosuch"), "no virtual cluster named 'nosuch'"),
    (("node", "drain", "node9"), "no node named 'node9'"),
])
def test_bad_requests_are_one_line_and_change_nothing(cluster, db, capsys, argv, message):
    generation = db.generation()
    code, _, err = vlx(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert db.generation() == generation


def test_graceful_stop_waits_for_the_guests_and_status_follows(cluster, db, capsys):
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    assert vlx(capsys, "vc", "start", "blue")[0] == 0
    code, out, err = vlx(capsys, "vc", "stop", "blue", "--timeout", "30")
    assert code == 0 and "stopped 2 VMs of blue: blue-1, blue-2" in out, err
    code, out, _ = vlx(capsys, "vc", "status", "blue")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        ("blue-1", "node1", "shut", "off"), ("blue-2", "node2", "shut", "off")]
    assert vlx(capsys, "vc", "destroy", "blue")[0] == 0
    code, out, _ = vlx(capsys, "vc", "status", "blue", "--json")
    assert out.count('"state": "not created"') == 2
