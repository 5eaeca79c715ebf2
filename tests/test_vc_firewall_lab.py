"""The firewall of VC bridges, live: node1 is a namespace running a real `vlx bootsvc run`
(dhcp, dns) and a TCP listener on all its addresses (standing for SSH, etcd, tgt, libvirt...),
node2 another namespace; green's network is built on both (bridges joined by VXLAN), and "VMs"
are namespaces plugged into the bridges with the VMs' MACs. From green-1: udhcpc still gets
its lease and dig its answers from the service address, but nothing else of node1 answers, nor
the cluster network behind it (even with forwarding switched on in node1), while green-2 on
node2 answers across VXLAN. The nft drop counters count what was dropped, and with the table
taken away the same connections go through: it is the firewall that stops them. Removing the
VC network removes the table."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from virtualinux.vm_test.netns import Namespace
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import inventory
from virtualinux.vvcm.virt import firewall, network

from .conftest import EXAMPLE
from .test_dhcp_lab import events, recording_script
from .test_vc_bootsvc_lab import served, serving_node1, vm_port

pytestmark = pytest.mark.lab
NODE1, NODE2, BEYOND = "198.18.0.11", "198.18.0.12", "198.18.0.1"
SERVICE, GREEN2 = "198.19.3.254", "198.19.3.2"
PORT = 2222
# A listener that notes every connection it accepts; it says when it listens.
LISTENER = """\
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
log = open(sys.argv[3], "a", buffering=1)
log.write("listening\\n")
while True:
    conn, peer = server.accept()
    log.write(f"accepted {peer[0]}\\n")
    conn.close()
"""
CONNECT = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("connected")
except OSError as err:
    print("refused" if isinstance(err, ConnectionRefusedError) else "no answer")
"""


def listen(ns: Namespace, address: str, log: Path) -> subprocess.Popen:
    process = ns.popen([sys.executable, "-c", LISTENER, address, str(PORT), str(log)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: log.exists() and "listening" in log.read_text(), 30,
             f"a listener on {address}:{PORT} in {ns.name}")
    return process


def connect(ns: Namespace, address: str, port: int = PORT, wait: float = 3.0) -> str:
    """What a TCP connect from `ns` meets: "connected", "refused" or "no answer" (dropped:
    `wait` is only how long to wait for an answer that a drop never sends)."""
    return ns.run([sys.executable, "-c", CONNECT, address, str(port), str(wait)],
                  timeout=60).stdout.strip()


def accepted(log: Path) -> list[str]:
    return [line.split()[1] for line in log.read_text().splitlines()
            if line.startswith("accepted")]


def sysctl(ns: Namespace, name: str, value: str) -> None:
    ns.run(["sysctl", "-q", "-w", f"{name}={value}"])


def test_a_vm_reaches_its_vc_dhcp_and_dns_and_nothing_else_of_the_node(
        db, db_path, netns, tmp_path):
    with serving_node1(db, db_path, netns, tmp_path) as (node1, hub, bridge):
        cluster = db.load()
        node2 = netns.namespace("node2")
        netns.plug(hub, bridge, node2, address=f"{NODE2}/24")
        hub.add_address(bridge, f"{BEYOND}/24")
        plans = {plan.node: plan for plan in network.node_plans(cluster, "green",
                                                                ["node1", "node2"])}
        on1 = dataclasses.replace(plans["node1"], netns=node1.namespace.name)
        on2 = dataclasses.replace(plans["node2"], netns=node2.name)
        try:
            _check_firewall(cluster, netns, node1, hub, node2, on1, on2, tmp_path)
        finally:
            for plan in (on1, on2):
                network.remove(plan)
        assert firewall.tables(on1.netns, "node1") == []
        assert firewall.tables(on2.netns, "node2") == []
        assert network.devices_present(on1) == []


def _check_firewall(cluster, netns, node1, hub, node2, on1, on2, tmp_path) -> None:
    for plan in (on1, on2):
        assert "vlx_vc_green" in network.ensure(plan)
    assert network.ensure(on1) == []                   # a second run changes nothing
    assert firewall.tables(on1.netns, "node1") == ["vlx_vc_green"]
    wait_for(lambda: served(node1, "dns", "vc_addresses") == [SERVICE], 30,
             "dns on green's service address")

    node_log, beyond_log, green2_log = (tmp_path / f"{n}.log" for n in ("n1", "hub", "g2"))
    listeners = [listen(node1.namespace, "0.0.0.0", node_log),
                 listen(hub, BEYOND, beyond_log)]
    green1 = vm_port(netns, node1, on1.bridge, cluster, "green-1")
    green2 = netns.namespace("green-2")
    netns.plug(node2, on2.bridge, green2, address=f"{GREEN2}/24",
               mac=next(vm.mac for vm in cluster.vms if vm.name == "green-2"))
    listeners.append(listen(green2, GREEN2, green2_log))
    try:
        # DHCP still leases, DNS on the service address still answers (UDP and TCP).
        script, out = recording_script(tmp_path, "green-1")
        green1.run(["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-s", str(script), "-t", "5",
                    "-T", "1"], timeout=60)
        bound = next(e for e in events(out) if e["EVENT"] == "bound")
        assert (bound["ip"], bound["serverid"]) == ("198.19.3.1", SERVICE)
        green1.add_address("eth0", f"{bound['ip']}/24")
        for transport in ("+notcp", "+tcp"):
            answer = green1.run(["dig", "+short", transport, "+tries=3", f"@{SERVICE}",
                                 "green-2.green.cluster.lab"], timeout=60).stdout.split()
            assert answer == [GREEN2], transport

        # The other VM of the VC, on node2 across VXLAN.
        assert connect(green1, GREEN2, wait=30) == "connected"
        assert accepted(green2_log) == ["198.19.3.1"]

        # Nothing else of node1: its other ports on the service address, its cluster
        # address (routed there through the service address), the cluster network beyond,
        # even with node1 forwarding; nor anything on the cluster network into the VC.
        with green1.netlink() as ipr:
            ipr.route("add", dst="198.18.0.0/24", gateway=SERVICE)
        with hub.netlink() as ipr:
            ipr.route("add", dst="198.19.3.0/24", gateway=NODE1)
        sysctl(node1.namespace, "net.ipv4.ip_forward", "1")
        sysctl(node1.namespace, f"net.ipv4.conf.{on1.bridge}.forwarding", "1")
        assert connect(hub, NODE1, wait=30) == "connected"    # node1's listener is up
        assert accepted(node_log) == [BEYOND]
        blocked = [(green1, SERVICE, PORT), (green1, NODE1, PORT), (green1, NODE1, 53),
                   (green1, BEYOND, PORT), (hub, "198.19.3.1", 67)]
        before = firewall.dropped("green", on1.netns, "node1")
        assert [connect(ns, address, port) for ns, address, port in blocked] == [
            "no answer"] * len(blocked)
        after = firewall.dropped("green", on1.netns, "node1")
        # Each connect retries its SYN at least once in the 3 s: two packets at least.
        assert after["to_node"] - before["to_node"] >= 2 * 3
        assert after["routed"] - before["routed"] >= 2 * 2
        assert accepted(node_log) == [BEYOND] and accepted(beyond_log) == []

        # The same without the table: it is the firewall that stopped them.
        firewall.remove("green", on1.netns, "node1")
        assert connect(green1, NODE1, wait=30) == "connected"
        assert connect(green1, BEYOND, wait=30) == "connected"
        assert accepted(node_log) == [BEYOND, "198.19.3.1"]
        assert accepted(beyond_log) == ["198.19.3.1"]
        assert "vlx_vc_green" in network.ensure(on1)       # back, as a restart would
        assert connect(green1, NODE1) == "no answer"
    finally:
        for process in listeners:
            process.kill()
            process.wait(10)


def test_tables_of_vcs_gone_from_the_node_or_left_by_a_killed_run_are_removed(db, netns):
    cluster = db.update("db import", "test",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    ns = netns.namespace("node1")
    node = dataclasses.replace(cluster.node("node1"), netns=ns.name)
    plans = [dataclasses.replace(plan, netns=ns.name)
             for plan in network.plans_for_node(cluster, "node1")]
    for plan in plans:
        network.ensure(plan)
    # A run killed after making the table of a VC that is not here (any more), and a table
    # of someone else's that merely looks like ours.
    firewall.ensure(firewall.VcFirewall(vc="gone", bridge="vlxbr999"), ns.name, "node1")
    ns.run(["nft", "add", "table", "inet", "vlx_vc_Other"])
    ours = sorted(firewall.table_name(plan.vc) for plan in plans)
    assert firewall.tables(ns.name, "node1") == sorted(ours + ["vlx_vc_gone", "vlx_vc_Other"])

    assert network.remove_stale(node, plans) == ["vlx_vc_gone"]
    assert firewall.tables(ns.name, "node1") == sorted(ours + ["vlx_vc_Other"])
    assert network.remove_stale(node, []) == sorted(
        [name for plan in plans for name in (plan.tunnel, plan.bridge)],
        key=lambda name: name.startswith("vlxbr")) + ours
    assert firewall.tables(ns.name, "node1") == ["vlx_vc_Other"]
    assert firewall.remove("gone", ns.name, "node1") is False     # quiet when not there


# A node's start-up: its own namespace (node.netns None), nothing of a VC in it.
OWN_NAMESPACE = """
import dataclasses, json, sys
from virtualinux.vvcm import Database
from virtualinux.vvcm.virt import network
node = dataclasses.replace(Database(sys.argv[1]).load().node("node1"), netns=None)
removed = network.remove_stale(node, [])
print(json.dumps({"removed": removed, "netlink": "pyroute2" in sys.modules}))
"""


def test_a_node_with_no_vc_device_finds_nothing_stale_without_netlink(db, db_path, netns):
    db.update("db import", "test",
              lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    ns = netns.namespace("node1")
    ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])
    ns.run(["ip", "link", "set", "eth0", "up"])
    ns.add_address("eth0", "198.18.0.11/24")
    # A table of a VC gone: still found (nft), though no device is.
    firewall.ensure(firewall.VcFirewall(vc="gone", bridge="vlxbr999"), ns.name, "node1")

    def remove_stale() -> dict:
        done = ns.run([sys.executable, "-c", OWN_NAMESPACE, str(db_path)])
        return json.loads(done.stdout)

    assert remove_stale() == {"removed": ["vlx_vc_gone"], "netlink": False}
    # A stale bridge is a reason to open netlink, and it goes.
    ns.run(["ip", "link", "add", "vlxbr998", "type", "bridge"])
    assert remove_stale() == {"removed": ["vlxbr998"], "netlink": True}
    assert "vlxbr998" not in ns.run(["ip", "-o", "link"]).stdout
