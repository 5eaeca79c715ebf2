"""A node's start-up against a real etcd store in a lab namespace: it boots from a local copy
of the store, and boots again from that copy while the store is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from virtualinux.vm_test.etcd import Lab
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import Database

from .conftest import EXAMPLE, require
from .test_initscripts import node_root

pytestmark = pytest.mark.lab


@pytest.fixture
def lab(netns, tmp_path):
    require("etcd", "etcdctl")
    lab = Lab(netns, tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def start_up(lab: Lab, root, copy) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLX_STORE": lab.url, "VLX_DB": str(copy)}
    return lab.admin.run([sys.executable, "-m", "virtualinux.initscripts", "--node", "node3",
                          "--root", str(root)], check=False, timeout=120, env=env)


def test_a_node_starts_from_a_local_copy_of_the_store_and_again_with_the_store_down(
        lab, tmp_path):
    lab.etcd(1)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    # node3's root with what its cpio hands it (its SSH host key), as the initramfs leaves it;
    # the store is read from inside the lab's namespaces, through a copy
    seen = tmp_path / "seen.db"
    assert lab.vlx("db", "migrate", "--to", f"sqlite:{seen}").returncode == 0
    root = node_root(tmp_path, cluster=Database(seen).load(), node="node3")
    copy = tmp_path / "copy.db"
    first = start_up(lab, root, copy)
    assert first.returncode == 0, first.stdout + first.stderr
    assert Database(copy).load().node("node3").ip.exploded == "198.18.0.13"
    assert f"[30 database] ok: client of {lab.url}, serving a local copy" in first.stdout
    env = (root / "etc/default/virtualinux-bootsvc").read_text()
    assert f"VLX_STORE={lab.url}" in env and f"VLX_DB={copy}" in env

    lab.kill(lab.members[0])            # the store is gone: the node still starts
    again = start_up(lab, root, copy)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[10 identity] ok: node3 198.18.0.13" in again.stdout


def test_a_db_node_joins_the_running_member_once_however_often_start_up_runs(lab, tmp_path):
    """The database step of a db node with no data yet: etcd's MemberAdd through the store
    (once, also when the step runs again before the member starts), then the member started
    from what the step wrote joins with --initial-cluster-state existing."""
    url = lab.etcd(1)
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(EXAMPLE.read_text().replace(
        'roles = ["gateway-backup", "storage"]', 'roles = ["gateway-backup", "storage", "db"]'))
    assert lab.vlx("db", "import", str(inventory)).returncode == 0
    node2 = lab.add("node2", "198.18.0.12")
    root, copy = node_root(tmp_path), tmp_path / "copy.db"
    env = {**os.environ, "VLX_STORE": url, "VLX_DB": str(copy)}
    for _ in range(2):
        ran = node2.ns.run([sys.executable, "-m", "virtualinux.initscripts", "--node", "node2",
                            "--root", str(root)], check=False, timeout=120, env=env)
        assert "[30 database] ok: etcd member node2 on 198.18.0.12 joins the running " \
               "members (2 in its initial cluster)" in ran.stdout, ran.stdout + ran.stderr
    listed = json.loads(lab.etcdctl("member", "list", "-w", "json"))["members"]
    assert sorted(m.get("name", "") for m in listed) == ["", "e1"]    # node2 added, once
    written = dict(line.split("=", 1) for line in
                   (root / "etc/default/virtualinux-etcd").read_text().splitlines()[1:])
    assert written["VLX_ETCD_INITIAL_CLUSTER"] == \
        "e1=http://198.18.0.31:2380,node2=http://198.18.0.12:2380"
    assert written["VLX_ETCD_OPTIONS"] == "--join --heartbeat-ms 100 --election-ms 1000"
    # What virtualinux-etcd.service runs with that file (etcd, $VLX_ETCD_ARGS split in
    # words), with the member's data in the test's directory; the lab's slower Raft timing.
    arguments = written["VLX_ETCD_ARGS"].split()
    for flag, value in (("--data-dir", node2.data_dir), ("--heartbeat-interval", lab.timing[0]),
                        ("--election-timeout", lab.timing[1])):
        arguments[arguments.index(flag) + 1] = str(value)
    assert arguments[arguments.index("--initial-cluster-state") + 1] == "existing"
    node2.process = node2.ns.popen(["etcd", *arguments], stdout=node2.log.open("a"),
                                   stderr=subprocess.STDOUT)
    wait_for(lambda: lab.healthy(lab.members), 90, "node2 to join e1 as a healthy member",
             interval=0.5)
    listed = json.loads(lab.etcdctl("member", "list", "-w", "json"))["members"]
    assert sorted(m["name"] for m in listed) == ["e1", "node2"]


# The uplink step's netlink part, in a namespace standing for a gateway node.
UPLINK_PROBE = """
import ipaddress, sys
from virtualinux.initscripts.steps.uplink import configure
cluster_ip = ipaddress.IPv4Address(sys.argv[3]) if len(sys.argv) > 3 else None
print(configure(sys.argv[1], ipaddress.IPv4Interface(sys.argv[2]), cluster_ip))
"""


def test_a_gateway_node_brings_its_uplink_up_with_the_database_address_only(netns):
    hub, node = netns.namespace("hub"), netns.namespace("node")
    netns.bridge(hub)
    # A stale address (an older database's) is on the link, which is down.
    netns.plug(hub, "br0", node, "eth1", address="198.18.1.200/24")
    node.set_link("eth1", False)

    def configure(address: str) -> str:
        done = node.run([sys.executable, "-c", UPLINK_PROBE, "eth1", address], check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert configure("198.18.1.254/24") == "(removed 198.18.1.200/24)"
    assert [a for a in node.ipv4_addresses() if not a.startswith("127.")] == \
        ["198.18.1.254/24"]
    with node.netlink() as ipr:
        assert ipr.get_links(ifname="eth1")[0]["flags"] & 1     # IFF_UP
    assert configure("198.18.1.254/24") == "(unchanged)"
    done = node.run([sys.executable, "-c", UPLINK_PROBE, "eth9", "198.18.1.254/24"],
                    check=False)
    assert done.returncode != 0 and "no link eth9 (gateway_uplink)" in done.stderr
    # The cluster interface named as the uplink by mistake: refused, its address kept.
    done = node.run([sys.executable, "-c", UPLINK_PROBE, "eth1", "198.18.1.9/24",
                     "198.18.1.254"], check=False)
    assert done.returncode != 0 and "holds this node's cluster address" in done.stderr
    assert [a for a in node.ipv4_addresses() if not a.startswith("127.")] == \
        ["198.18.1.254/24"]
