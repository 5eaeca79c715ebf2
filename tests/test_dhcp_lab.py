"""DHCP against real clients in network namespaces: dhclient, udhcpc, perfdhcp, two replicas
with one killed, and garbage on the wire. Each replica is a real `vlx bootsvc run` process."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from virtualinux.bench import dhcp as bench
from virtualinux.bootsvc import dhcp
from virtualinux.bootsvc import dhcp_wire as wire
from virtualinux.bootsvc.status import Status, read_status, wait_running
from virtualinux.vm_test.netns import Namespace, Netns
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import Node, VlxError, changes, inventory
from virtualinux.vvcm.cli import main
from virtualinux.vvcm.command import vlx_command

from .conftest import EXAMPLE, require
from .test_dhcp_wire import scapy_request

pytestmark = pytest.mark.lab

NODE1_MAC = "52:54:00:00:00:11"
A, B = "198.18.0.201", "198.18.0.202"
VLX = vlx_command()


@dataclasses.dataclass
class Replica:
    address: str
    process: subprocess.Popen
    state_dir: Path
    log: Path
    namespace: Namespace

    def status(self) -> Status:
        return read_status(self.state_dir)

    def wait_running(self) -> Status:
        try:
            return wait_running(self.state_dir, self.process.pid, 30,
                                exited=lambda: self.process.poll() is not None)
        except VlxError as err:
            raise AssertionError(f"{err}:\n{self.log.read_text()}") from None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(10)


@dataclasses.dataclass
class Segment:
    """One switch (a bridge in a hub namespace) with replicas and clients plugged in."""

    netns: Netns
    db_path: Path
    tmp: Path
    replicas: list[Replica] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.hub = self.netns.namespace("hub")
        self.bridge = self.netns.bridge(self.hub)

    def plug(self, role: str, address: str | None = None, mac: str | None = None) -> Namespace:
        ns = self.netns.namespace(role)
        self.netns.plug(self.hub, self.bridge, ns, address=address, mac=mac)
        return ns

    def replica(self, address: str, *extra: str, prefix: int = 24) -> Replica:
        ns = self.plug(f"r{address.rsplit('.', 1)[1]}", f"{address}/{prefix}")
        state_dir = self.tmp / f"state-{address}"
        log = self.tmp / f"replica-{address}.log"
        process = ns.popen([*VLX, "--db",
                            str(self.db_path), "bootsvc", "run", "--interface", "eth0",
                            "--address", address, "--state-dir", str(state_dir), *extra],
                           stdout=log.open("w"), stderr=subprocess.STDOUT)
        replica = Replica(address, process, state_dir, log, ns)
        self.replicas.append(replica)
        replica.wait_running()
        return replica

    def close(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.process.kill()
            replica.process.wait(10)


@pytest.fixture
def lab_db(db, db_path):
    db.update("db import", "test",
              lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    # Short leases, so renewal and rebinding happen within a test.
    db.update("settings", "lease 60 s", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=60)))
    return db


@pytest.fixture
def segment(netns, db_path, tmp_path):
    require("dhclient", "udhcpc", "perfdhcp")
    seg = Segment(netns, db_path, tmp_path)
    try:
        yield seg
    finally:
        seg.close()


def recording_script(tmp: Path, name: str) -> tuple[Path, Path]:
    """A client hook that only writes what it was told, one JSON line per call: values from
    the network are never evaluated by a shell."""
    out = tmp / f"{name}.jsonl"
    script = tmp / f"{name}.py"
    script.write_text(f"#!{sys.executable}\n"
                      "import json, os, sys\n"
                      f"with open({str(out)!r}, 'a') as f:\n"
                      "    event = sys.argv[1] if len(sys.argv) > 1 else ''\n"
                      "    f.write(json.dumps(dict(os.environ, EVENT=event)) + '\\n')\n")
    script.chmod(0o755)
    return script, out


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def udhcpc(ns: Namespace, script: Path, *extra: str) -> list[str]:
    return ["udhcpc", "-i", "eth0", "-f", "-s", str(script), "-t", "5", "-T", "1", *extra]


def test_dhclient_gets_address_router_dns_and_host_name(lab_db, segment, tmp_path):
    segment.replica(A)
    client = segment.plug("client", mac=NODE1_MAC)
    script, out = recording_script(tmp_path, "dhclient")
    conf = tmp_path / "dhclient.conf"
    conf.write_text("request subnet-mask, broadcast-address, routers, domain-name, "
                    "domain-name-servers, host-name, ntp-servers;\ntimeout 20;\n")
    result = client.run(["dhclient", "-4", "-1", "-v", "-cf", str(conf), "-sf", str(script),
                         "-lf", str(tmp_path / "leases"), "-pf", str(tmp_path / "pid"),
                         "eth0"], check=False, timeout=40)
    bound = [e for e in events(out) if e.get("reason") == "BOUND"]
    assert bound, result.stderr
    lease = bound[-1]
    assert lease["new_ip_address"] == "198.18.0.11"
    assert lease["new_subnet_mask"] == "255.255.255.0"
    assert lease["new_routers"] == "198.18.0.254"
    assert lease["new_domain_name_servers"] == "198.18.0.12 198.18.0.13 198.18.0.14"
    assert lease["new_host_name"] == "node1"
    assert lease["new_domain_name"] == "cluster.lab"
    assert lease["new_ntp_servers"] == "198.18.1.123"
    assert lease["new_dhcp_server_identifier"] == A
    assert lease["new_dhcp_lease_time"] == "60"


def test_udhcpc_gets_address_router_dns_and_host_name(lab_db, segment, tmp_path):
    replica = segment.replica(A)
    client = segment.plug("client", mac=NODE1_MAC)
    script, out = recording_script(tmp_path, "udhcpc")
    result = client.run(udhcpc(client, script, "-q", "-n"), check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    lease = next(e for e in events(out) if e["EVENT"] == "bound")
    assert lease["ip"] == "198.18.0.11" and lease["subnet"] == "255.255.255.0"
    assert lease["router"] == "198.18.0.254"
    assert lease["dns"].split() == ["198.18.0.12", "198.18.0.13", "198.18.0.14"]
    assert lease["hostname"] == "node1" and lease["domain"] == "cluster.lab"
    assert lease["serverid"] == A and lease["lease"] == "60"
    wait_for(lambda: replica.status().counters("dhcp").get("DHCPACK"), 3,
             "the ACK to show in the status file")
    assert f"DHCPACK {NODE1_MAC} -> 198.18.0.11 node1 (gen 2)" in replica.log.read_text()


def test_client_rebinds_with_other_replica_after_kill(lab_db, segment, tmp_path):
    replicas = {A: segment.replica(A), B: segment.replica(B)}
    client = segment.plug("client", mac=NODE1_MAC)
    script, out = recording_script(tmp_path, "udhcpc")
    client.popen(udhcpc(client, script), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    lease = wait_for(lambda: next((e for e in events(out) if e["EVENT"] == "bound"), None), 15,
                     "the first lease")
    leased_from, other = lease["serverid"], (B if lease["serverid"] == A else A)
    # What the client's hook would do: configure the address, so it can renew by unicast.
    client.add_address("eth0", f"{lease['ip']}/24")
    wait_for(lambda: replicas[other].status().counters("dhcp").get("ignored_other_server"),
             3, "the other replica to leave the REQUEST to the one it named")
    assert replicas[leased_from].stop() == 0
    # T1 is 30 s; with the server gone udhcpc's renewal fails and it rebinds by broadcast.
    renewed = wait_for(lambda: next((e for e in events(out) if e["EVENT"] == "renew"), None),
                       60, "the client to rebind with the surviving replica", interval=0.5)
    assert renewed["ip"] == lease["ip"] == "198.18.0.11"
    assert renewed["serverid"] == other
    assert not [e for e in events(out) if e["EVENT"] in ("deconfig", "nak", "leasefail")][1:]


def test_perfdhcp_completes_dora_and_every_request_read_is_answered(segment, db_path,
                                                                     tmp_path):
    """perfdhcp (a real peer) completes DORA exchanges, and every DISCOVER and REQUEST the
    replica read got its OFFER or ACK. How many it can take without a drop is a figure of
    bench/dhcp.py on a quiet machine, not something a shared one can promise."""
    count = 1000
    bench.cluster_database(db_path, count)
    replica = segment.replica(str(bench.SERVER_ADDRESS), "--quiet", prefix=bench.CIDR.prefixlen)
    client = segment.plug("perf", f"{bench.CLIENT_ADDRESS}/{bench.CIDR.prefixlen}")
    macs = tmp_path / "macs"
    macs.write_text("".join(bench.node_mac(i) + "\n" for i in range(count)))
    result = bench.perfdhcp(client, macs, count, rate=100, seconds=3, timeout=60)
    assert result.sent > 0 and result.received > 0, result
    assert replica.stop() == 0
    counters = replica.status().counters("dhcp")       # the final ones, written at stop
    assert counters["DHCPDISCOVER"] > 0 and counters["DHCPREQUEST"] > 0, counters
    assert counters["DHCPOFFER"] == counters["DHCPDISCOVER"], counters
    assert counters["DHCPACK"] == counters["DHCPREQUEST"], counters
    assert not [name for name in counters if name.startswith(("dropped_", "ignored_"))]
    # perfdhcp cannot have more answers than the replica sent.
    assert result.received <= counters["DHCPOFFER"] + counters["DHCPACK"]


BURST_CLIENT = """
import socket, sys, time
macs = [bytes.fromhex(line.replace(":", "")) for line in open(sys.argv[1])]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
sock.bind(("0.0.0.0", 68))
print("bound", flush=True)
sys.stdin.readline()                # the replica is stopped: send the burst now
for xid, mac in enumerate(macs, 1):
    header = bytes([1, 1, 6, 0]) + xid.to_bytes(4, "big") + bytes(20) + mac + bytes(10 + 192)
    sock.sendto(header + bytes.fromhex("63825363") + bytes([53, 1, 1, 255]),
                ("255.255.255.255", 67))
print("sent", flush=True)
sock.settimeout(10)
offered = set()
try:
    while len(offered) < len(macs):
        data = sock.recv(2048)
        if data[0] == 2:
            offered.add(int.from_bytes(data[4:8], "big"))
except socket.timeout:
    pass
print(len(offered), flush=True)
"""


def test_a_burst_queued_while_the_replica_was_stopped_is_answered_in_full(segment, db_path,
                                                                         tmp_path):
    """Every DISCOVER of a burst that queued up while the replica could not run (SIGSTOP)
    gets its OFFER: it is read and answered in batches (recvmmsg, sendmmsg), and nothing in a
    batch is lost."""
    count = 150
    bench.cluster_database(db_path, count)
    replica = segment.replica(str(bench.SERVER_ADDRESS), "--quiet", prefix=bench.CIDR.prefixlen)
    client = segment.plug("burst", f"{bench.CLIENT_ADDRESS}/{bench.CIDR.prefixlen}")
    (tmp_path / "macs").write_text("".join(bench.node_mac(i) + "\n" for i in range(count)))
    (tmp_path / "burst.py").write_text(BURST_CLIENT)
    burst = client.popen([sys.executable, str(tmp_path / "burst.py"), str(tmp_path / "macs")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert burst.stdout.readline() == "bound\n"
        replica.process.send_signal(signal.SIGSTOP)
        try:
            burst.stdin.write("go\n")
            burst.stdin.flush()
            assert burst.stdout.readline() == "sent\n"
        finally:
            replica.process.send_signal(signal.SIGCONT)
        offered = int(burst.stdout.readline())
    finally:
        burst.kill()
        burst.wait(10)
    assert offered == count
    assert replica.stop() == 0
    counters = replica.status().counters("dhcp")
    assert counters["DHCPDISCOVER"] == counters["DHCPOFFER"] == count, counters


MALFORMED_SENDER = """
import signal, socket, sys, time
packets = [bytes.fromhex(line) for line in open(sys.argv[1])]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("started", flush=True)
sent, end = 0, time.monotonic() + float(sys.argv[2])
# Until told to stop (SIGTERM), bounded in time; paced: a round every 5 ms.
while not stop and time.monotonic() < end:
    for packet in packets:
        sock.sendto(packet, ("255.255.255.255", 67))
        sent += 1
    time.sleep(0.005)
print(sent, flush=True)
"""


def malformed_packets() -> list[bytes]:
    corpus = Path(__file__).parent / "corpus" / "dhcp"
    packets = [p.read_bytes() for p in sorted(corpus.glob("*.bin"))
               if not p.name.startswith("ok--")]
    valid = scapy_request("discover", bytes.fromhex("525400000012"))
    # Fuzzed: every third byte of the header and cookie flipped in turn, kept if the parser
    # rejects it (what it accepts would be a valid message, not garbage).
    for position in range(0, wire.OPTIONS_START, 3):
        mutated = bytearray(valid)
        mutated[position] ^= 0xA5
        try:
            wire.parse_request(bytes(mutated))
        except wire.MalformedPacket:
            packets.append(bytes(mutated))
    return packets


def test_malformed_packets_are_dropped_and_a_client_is_still_served(lab_db, segment,
                                                                    tmp_path):
    replica = segment.replica(A, "--quiet")
    attacker = segment.plug("attacker", "198.18.0.77/24")
    client = segment.plug("client", mac=NODE1_MAC)
    packets = malformed_packets()
    (tmp_path / "packets").write_text("".join(p.hex() + "\n" for p in packets))
    (tmp_path / "sender.py").write_text(MALFORMED_SENDER)
    script, out = recording_script(tmp_path, "udhcpc")

    def lease() -> None:
        result = client.run(udhcpc(client, script, "-q", "-n"), check=False, timeout=30)
        assert result.returncode == 0 and events(out)[-1]["ip"] == "198.18.0.11"
    lease()
    flood = attacker.popen([sys.executable, str(tmp_path / "sender.py"),
                            str(tmp_path / "packets"), "120"], stdout=subprocess.PIPE,
                           text=True)
    try:
        assert flood.stdout.readline() == "started\n"
        acks = replica.status().counters("dhcp").get("DHCPACK", 0)
        # Served while the garbage keeps coming: the flood stops only when told.
        lease()
        assert flood.poll() is None, "the flood ended before the client was served"
    finally:
        flood.terminate()
    sent = int(flood.communicate(timeout=30)[0])
    assert flood.returncode == 0 and sent > len(packets)
    # How much longer a lease takes in a flood is for bench/dhcp.py; here: it was served.
    wait_for(lambda: replica.status().counters("dhcp").get("DHCPACK", 0) > acks, 30,
             "the ACK given in the flood to be counted")

    def dropped() -> int:
        counters = replica.status().counters("dhcp")
        return sum(v for k, v in counters.items() if k.startswith("dropped_"))
    # Every datagram sent is accounted for: counted by the replica, or dropped by the kernel
    # when a starved replica's receive queue was full (a shared machine can do that).
    wait_for(lambda: dropped() + bench.socket_drops(replica.namespace) >= sent, 30,
             f"{sent} drops to be counted (have {dropped()})")
    assert dropped() <= sent
    assert replica.process.poll() is None
    assert "dropped a malformed packet from 198.18.0.77" in replica.log.read_text()
    assert replica.log.read_text().count("dropped a malformed packet") == 1


def test_daemon_reloads_a_new_generation_and_serves_the_new_node(lab_db, segment, tmp_path):
    replica = segment.replica(A, "--poll", "0.2")
    mac, ip = "52:54:00:00:00:15", "198.18.0.15"
    client = segment.plug("client", mac=mac)
    script, out = recording_script(tmp_path, "udhcpc")
    before = client.run(udhcpc(client, script, "-q", "-n", "-t", "2"), check=False, timeout=20)
    assert before.returncode != 0 and replica.status().counters("dhcp")[
        "ignored_unknown_mac"] >= 1
    newer = lab_db.update("node add", "node5", lambda c: changes.add_node(c, Node(
        name="node5", mac=mac, ip=ipaddress.IPv4Address(ip), cpus=2, memory=1024)))
    wait_for(lambda: replica.status().generation == newer.generation, 5, "the reload")
    after = client.run(udhcpc(client, script, "-q", "-n"), check=False, timeout=20)
    assert after.returncode == 0 and events(out)[-1]["ip"] == ip
    assert events(out)[-1]["hostname"] == "node5"
    assert f"DHCPACK {mac} -> {ip} node5 (gen {newer.generation})" in replica.log.read_text()


def test_daemon_never_goes_back_to_an_older_generation(lab_db, segment, db_path, tmp_path):
    old_copy = tmp_path / "old.db"
    old_copy.write_bytes(db_path.read_bytes())
    newer = lab_db.update("settings", "lease 120 s", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=120)))
    replica = segment.replica(A, "--poll", "0.2")
    assert replica.status().generation == newer.generation
    os.replace(old_copy, db_path)   # a database restored from an old backup
    wait_for(lambda: replica.status().stale_generations_refused >= 1, 5, "the refusal")
    assert replica.status().generation == newer.generation
    client = segment.plug("client", mac=NODE1_MAC)
    script, out = recording_script(tmp_path, "udhcpc")
    assert client.run(udhcpc(client, script, "-q", "-n"), timeout=20).returncode == 0
    assert events(out)[-1]["lease"] == "120"   # still the newer generation's answer
    assert "older than gen" in replica.log.read_text()


def test_sigterm_stops_the_daemon_cleanly_and_status_says_so(lab_db, segment, tmp_path):
    replica = segment.replica(A)
    vlx = [*VLX, "bootsvc", "status", "--state-dir",
           str(replica.state_dir)]
    running = subprocess.run(vlx, capture_output=True, text=True, timeout=20)
    assert running.returncode == 0 and running.stdout.startswith("running: (not a node) on eth0")
    as_json = json.loads(subprocess.run(vlx + ["--json"], capture_output=True, text=True,
                                        timeout=20).stdout)
    assert as_json["address"] == A and as_json["generation"] == 2
    assert replica.stop() == 0
    stopped = subprocess.run(vlx, capture_output=True, text=True, timeout=20)
    assert stopped.returncode == 1 and stopped.stdout.startswith("stopped:")
    assert "bootsvc stopped at gen 2" in replica.log.read_text()


def test_replica_on_a_node_finds_its_node_from_the_interface(lab_db, segment, tmp_path):
    ns = segment.plug("node2", "198.18.0.12/24")
    state_dir = tmp_path / "state-node2"
    log = tmp_path / "node2.log"
    process = ns.popen([*VLX, "--db", str(segment.db_path), "bootsvc", "run", "--interface",
                        "eth0", "--state-dir", str(state_dir)],
                       stdout=log.open("w"), stderr=subprocess.STDOUT)
    replica = Replica("198.18.0.12", process, state_dir, log, ns)
    segment.replicas.append(replica)
    assert replica.wait_running().node == "node2"
    client = segment.plug("client", mac=NODE1_MAC)
    script, out = recording_script(tmp_path, "udhcpc")
    assert client.run(udhcpc(client, script, "-q", "-n"), timeout=20).returncode == 0
    assert events(out)[-1]["serverid"] == "198.18.0.12"
    assert "bootsvc node2 on eth0 (198.18.0.12)" in log.read_text()


def test_metamaster_learns_an_unknown_machine_from_the_discovery_pool(lab_db, segment,
                                                                      tmp_path, capsys):
    pool = (ipaddress.IPv4Address("198.18.0.100"), ipaddress.IPv4Address("198.18.0.149"))
    lab_db.update("settings", "pool", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, discovery_pool=pool)))
    replica = segment.replica(A)
    mac = "52:54:00:00:00:77"
    client = segment.plug("client", mac=mac)
    script, out = recording_script(tmp_path, "udhcpc")
    result = client.run(udhcpc(client, script, "-q", "-n"), check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    lease = events(out)[-1]
    assert pool[0] <= ipaddress.IPv4Address(lease["ip"]) <= pool[1]
    assert lease["hostname"] == "new-525400000077"
    wait_for(lambda: dhcp.discovered(replica.status()), 3,
             "the discovered MAC in the status file")
    assert main(["bootsvc", "discovered", "--state-dir", str(replica.state_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"mac": mac, "ip": lease["ip"]}]


def test_sighup_makes_the_daemon_take_a_new_generation_at_once(lab_db, segment, tmp_path):
    # Polling only once an hour: the new generation can come only from the SIGHUP.
    replica = segment.replica(A, "--poll", "3600")
    served = replica.status().generation
    newer = lab_db.update("settings", "lease 120 s", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=120)))
    replica.process.send_signal(signal.SIGHUP)
    wait_for(lambda: replica.status().generation == newer.generation, 30, "the reload")
    assert newer.generation == served + 1 and replica.status().reloads == 1
    assert replica.process.poll() is None
