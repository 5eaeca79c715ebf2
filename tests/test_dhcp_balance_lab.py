"""DHCP load balancing on the wire: six replicas, each a `vlx bootsvc run --node NAME` process
in its own namespace on one bridge, as the nodes node1..node6 of the database (role dhcp), and
a client node7 that is not a replica. A DISCOVER crafted with scapy gets exactly k OFFERs; a
client past the threshold gets six; with its chosen two killed, udhcpc and dhclient still get
their lease from the others."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
import sys
import time

import pytest
from virtualinux.bootsvc import balance
from virtualinux.vvcm import Node, changes, inventory

from .conftest import EXAMPLE, require
from .test_dhcp_lab import VLX, Segment, events, recording_script, udhcpc, wait_for

pytestmark = pytest.mark.lab

REPLICAS = tuple(f"node{i}" for i in range(1, 7))
CLIENT_MAC, CLIENT_IP = "52:54:00:00:00:17", "198.18.0.17"
K = 2

# Run in the client's namespace: sends one DISCOVER (PXE, so the OFFERs name a boot server),
# prints "sent", and on a line on stdin prints every OFFER it saw for that xid as JSON.
PROBE = """
import json, sys, threading
from scapy.all import AsyncSniffer, BOOTP, DHCP, IP, UDP, Ether, conf, sendp
conf.verb = 0
mac, xid, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ready = threading.Event()
sniffer = AsyncSniffer(iface="eth0", filter="udp and dst port 68", started_callback=ready.set)
sniffer.start()
assert ready.wait(10)
chaddr = bytes.fromhex(mac.replace(":", ""))
sendp(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
      / UDP(sport=68, dport=67) / BOOTP(chaddr=chaddr, xid=xid, secs=secs, flags=0x8000)
      / DHCP(options=[("message-type", "discover"), ("pxe_client_architecture", b"\\0\\0"),
                      "end"]), iface="eth0")
print("sent", flush=True)
sys.stdin.readline()
offers = []
for packet in sniffer.stop():
    if BOOTP in packet and packet[BOOTP].xid == xid and packet[BOOTP].op == 2:
        options = {o[0]: o[1] for o in packet[DHCP].options if isinstance(o, tuple)}
        offers.append({"server_id": options.get("server_id"), "yiaddr": packet[BOOTP].yiaddr,
                       "siaddr": packet[BOOTP].siaddr, "type": options.get("message-type")})
print(json.dumps(offers), flush=True)
"""


@pytest.fixture
def balanced_db(db):
    def nodes(c):
        c = inventory.apply(c, inventory.load(EXAMPLE), "test")
        for i in (5, 6, 7):
            c = changes.add_node(c, Node(name=f"node{i}", mac=f"52:54:00:00:00:1{i}",
                                         ip=ipaddress.IPv4Address(f"198.18.0.1{i}"), cpus=2,
                                         memory=1024))
        # Nodes 1-6 serve DHCP; node7 is the machine booting.
        nodes = tuple(dataclasses.replace(n, roles=(*n.roles, "dhcp")) if n.name in REPLICAS
                      else n for n in c.nodes)
        return changes.validated(dataclasses.replace(c, nodes=nodes))
    return db.update("db import", "test", nodes)


@pytest.fixture
def six(balanced_db, netns, db_path, tmp_path):
    seg = Segment(netns, db_path, tmp_path)
    try:
        for name in REPLICAS:
            seg.replica(str(balanced_db.node(name).ip), "--node", name, "--poll", "0.2")
        assert [r.status()["node"] for r in seg.replicas] == list(REPLICAS)
        yield seg
    finally:
        seg.close()


def by_name(seg: Segment) -> dict:
    return {r.status()["node"]: r for r in seg.replicas}


def counters(replica) -> dict:
    return replica.status()["services"]["dhcp"]


def probe(seg: Segment, tmp_path, xid: int, secs: int, seen: int) -> list[dict]:
    """One DISCOVER from node7's MAC; waits until every live replica has counted `seen`
    DISCOVERs (so each has answered or left it), then returns the OFFERs sniffed."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    client = seg.plug(f"probe{xid}", mac=CLIENT_MAC)
    process = client.popen([sys.executable, str(script), CLIENT_MAC, str(xid), str(secs)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "sent\n"
        live = [r for r in seg.replicas if r.process.poll() is None]
        wait_for(lambda: all(counters(r).get("DHCPDISCOVER", 0) >= seen for r in live), 10,
                 "every replica to take the DISCOVER")
        out, _ = process.communicate("stop\n", timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return json.loads(out.splitlines()[-1])


def test_a_discover_with_secs_0_gets_exactly_k_offers_for_the_same_address(six, tmp_path):
    require("tcpdump")
    offers = probe(six, tmp_path, xid=0x5151, secs=0, seen=1)
    chosen = balance.choose(bytes.fromhex(CLIENT_MAC.replace(":", "")), REPLICAS, K)
    ips = {name: f"198.18.0.1{name[-1]}" for name in REPLICAS}
    assert sorted(o["server_id"] for o in offers) == sorted(ips[name] for name in chosen)
    assert {o["yiaddr"] for o in offers} == {CLIENT_IP} and len(offers) == K
    # The boot server each OFFER names is the replica that sent it: TFTP and HTTP spread too.
    assert all(o["siaddr"] == o["server_id"] for o in offers)
    replicas = by_name(six)
    for name, replica in replicas.items():
        mine = counters(replica)
        assert mine.get("answered_chosen", 0) == (name in chosen)
        assert mine.get("left_to_others", 0) == (name not in chosen)
    shown = subprocess.run([*VLX, "bootsvc", "status", "--state-dir",
                            str(replicas[chosen[0]].state_dir)],
                           capture_output=True, text=True, timeout=20)
    assert "answered_chosen" in shown.stdout and shown.returncode == 0


def test_a_client_past_the_threshold_is_answered_by_all_six(six, tmp_path):
    offers = probe(six, tmp_path, xid=0x5252, secs=3, seen=1)
    assert sorted(o["server_id"] for o in offers) == [f"198.18.0.1{i}" for i in range(1, 7)]
    assert {o["yiaddr"] for o in offers} == {CLIENT_IP}
    fallback = sum(counters(r).get("answered_fallback", 0) for r in six.replicas)
    assert fallback == len(REPLICAS) - K


def kill_chosen(six: Segment) -> tuple[str, ...]:
    chosen = balance.choose(bytes.fromhex(CLIENT_MAC.replace(":", "")), REPLICAS, K)
    replicas = by_name(six)
    for name in chosen:
        replicas[name].process.kill()
        replicas[name].process.wait(10)
    return chosen


def test_udhcpc_gets_its_lease_with_the_chosen_replicas_killed(six, tmp_path):
    require("udhcpc")
    chosen = kill_chosen(six)
    client = six.plug("client", mac=CLIENT_MAC)
    script, out = recording_script(tmp_path, "udhcpc")
    started = time.monotonic()
    result = client.run(udhcpc(client, script, "-q", "-n"), check=False, timeout=30)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    lease = events(out)[-1]
    assert lease["ip"] == CLIENT_IP
    assert lease["serverid"] not in {f"198.18.0.1{name[-1]}" for name in chosen}
    # udhcpc retries after 1 s (-T 1) with the same xid and secs 1, under the threshold of 3:
    # the repeat rule answered its second DISCOVER.
    survivors = [r for r in six.replicas if r.process.poll() is None]
    wait_for(lambda: sum(counters(r).get("fallback_repeated_transaction", 0)
                         for r in survivors) >= len(survivors), 5, "the fallback counters")
    assert all(counters(r).get("answered_fallback") == counters(r).get(
        "fallback_repeated_transaction") for r in survivors)
    assert took < 10, f"udhcpc took {took:.1f} s"


def test_dhclient_gets_its_lease_with_the_chosen_replicas_killed(six, tmp_path):
    require("dhclient")
    chosen = kill_chosen(six)
    client = six.plug("client", mac=CLIENT_MAC)
    script, out = recording_script(tmp_path, "dhclient")
    conf = tmp_path / "dhclient.conf"
    conf.write_text("timeout 30;\ninitial-interval 1;\n")
    result = client.run(["dhclient", "-4", "-1", "-v", "-cf", str(conf), "-sf", str(script),
                         "-lf", str(tmp_path / "leases"), "-pf", str(tmp_path / "pid"),
                         "eth0"], check=False, timeout=45)
    bound = [e for e in events(out) if e.get("reason") == "BOUND"]
    assert bound, result.stderr
    assert bound[-1]["new_ip_address"] == CLIENT_IP
    assert bound[-1]["new_dhcp_server_identifier"] not in {
        f"198.18.0.1{name[-1]}" for name in chosen}
    survivors = [r for r in six.replicas if r.process.poll() is None]
    wait_for(lambda: sum(counters(r).get("answered_fallback", 0) for r in survivors)
             >= len(survivors), 5, "the fallback counters")
