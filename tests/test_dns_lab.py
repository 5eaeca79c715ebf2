"""The DNS service against dig, in namespaces: cluster answers over UDP and TCP from two
replicas, and forwarding to fake upstreams (tests/dns_upstream.py) that the test runs in
namespaces of their own: caching, TTL countdown, negative caching, TC -> TCP, failover, and
spoofed answers (wrong ID, wrong source, other question, out of bailiwick) that must not be
cached; a flood from one address is rate limited while another client is still answered."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from virtualinux.vvcm import changes, inventory
from virtualinux.vvcm.command import vlx_command

from .conftest import EXAMPLE, require

pytestmark = pytest.mark.lab

CLIENT, FLOODER = "198.18.0.200", "198.18.0.201"
REPLICAS = ("198.18.0.1", "198.18.0.2")
UPSTREAMS = ("198.18.0.51", "198.18.0.52")
SPOOFERS = ("198.18.0.61", "198.18.0.62")
UPSTREAM_SCRIPT = Path(__file__).parent / "dns_upstream.py"
WAIT = 30.0      # safety net for waits on events; never reached when things work


def wait_for(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclasses.dataclass
class DnsLab:
    client: object
    replicas: list[subprocess.Popen]
    upstream_logs: list[Path]

    def dig(self, *args: str, server: str = REPLICAS[0]) -> str:
        result = self.client.run(["dig", "+time=5", "+tries=1", f"@{server}", *args],
                                 check=False, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def records(self, *args: str, server: str = REPLICAS[0]) -> list[str]:
        """Answer and authority lines, whitespace normalised."""
        out = self.dig("+noall", "+answer", "+authority", *args, server=server)
        return [" ".join(line.split()) for line in out.splitlines() if line.strip()]

    def status(self, *args: str, server: str = REPLICAS[0]) -> str:
        return re.search(r"status: (\w+)", self.dig(*args, server=server)).group(1)

    def upstream_queries(self, index: int, name: str) -> list[str]:
        lines = self.upstream_logs[index].read_text().splitlines()
        return [line.split()[0] for line in lines if line.split()[1:2] == [name + "."]]

    def stop(self, index: int = 0) -> dict[str, int]:
        process = self.replicas[index]
        process.terminate()
        out, _ = process.communicate(timeout=20)
        return json.loads(out.strip().splitlines()[-1])["dns"]


@pytest.fixture
def dns_lab(db, db_path, netns, tmp_path):
    """Returns start(replicas=1, silent_first=False, sets=()) -> DnsLab; all of it is removed
    after the test."""
    require("dig")
    processes: list[subprocess.Popen] = []

    def start(replicas: int = 1, silent_first: bool = False, sets: tuple[str, ...] = ()):
        db.update("db import", "test",
                  lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
        db.update("settings", "test", lambda c: changes.set_settings(c, dataclasses.replace(
            c.settings, upstream_dns=tuple(map(ipaddress.IPv4Address, UPSTREAMS)))))
        lan = netns.namespace("lan")
        bridge = netns.bridge(lan)
        lan.add_address(bridge, f"{CLIENT}/24")
        lan.add_address(bridge, f"{FLOODER}/24")
        logs = []
        for index, (address, spoofer) in enumerate(zip(UPSTREAMS, SPOOFERS, strict=True)):
            up = netns.namespace(f"up{index + 1}")
            netns.plug(lan, bridge, up, address=f"{address}/24")
            up.add_address("eth0", f"{spoofer}/24")
            log = tmp_path / f"upstream{index + 1}.log"
            log.touch()
            silent = ["--silent"] if silent_first and index == 0 else []
            processes.append(up.popen([sys.executable, str(UPSTREAM_SCRIPT), "--address",
                                       address, "--spoof-from", spoofer, *silent],
                                      stdout=log.open("w"), stderr=subprocess.DEVNULL))
            logs.append(log)
        for log in logs:
            wait_for(lambda log=log: "ready" in log.read_text(), f"{log.name} ready")
        servers = []
        for index, address in enumerate(REPLICAS[:replicas]):
            ns = netns.namespace(f"r{index + 1}")
            netns.plug(lan, bridge, ns, address=f"{address}/24")
            process = ns.popen(
                vlx_command("--db", str(db_path), "bootsvc", "run", "--interface", "eth0",
                            "--address", address, "--netboot-root", str(tmp_path),
                            "--state-dir", str(tmp_path / f"state-{index + 1}"),
                            "--services", "dns", "--port", "dns=53",
                            "--set", "dns.upstream_timeout_ms=700",
                            *[f"--set={s}" for s in sets]),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            processes.append(process)
            assert process.stdout.readline().startswith("ready dns=53"), "dns did not start"
            servers.append(process)
        return DnsLab(lan, servers, logs)

    try:
        yield start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def test_dig_gets_cluster_answers_over_udp_and_tcp_and_two_replicas_agree(dns_lab):
    lab = dns_lab(replicas=2)
    for tcp in ("+notcp", "+tcp"):
        assert lab.records(tcp, "node1.cluster.lab", "A") == [
            "node1.cluster.lab. 300 IN A 198.18.0.11"]
        assert lab.records(tcp, "-x", "198.19.3.2") == [
            "2.3.19.198.in-addr.arpa. 300 IN PTR green-2.green.cluster.lab."]
        assert lab.records(tcp, "cluster.lab", "SOA") == [
            "cluster.lab. 60 IN SOA node1.cluster.lab. hostmaster.cluster.lab. 2 3600 600 "
            "86400 60"]
        assert sorted(lab.records(tcp, "cluster.lab", "NS")) == [
            f"cluster.lab. 300 IN NS node{i}.cluster.lab." for i in range(1, 5)]
        assert lab.status(tcp, "nosuch.cluster.lab") == "NXDOMAIN"
        assert lab.records(tcp, "nosuch.cluster.lab")[0].split()[3] == "SOA"
        assert lab.status(tcp, "node1.cluster.lab", "AAAA") == "NOERROR"
        assert lab.records(tcp, "node1.cluster.lab", "AAAA")[0].split()[3] == "SOA"
    for args in (["gateway.cluster.lab"], ["-x", "198.18.0.12"], ["cluster.lab", "NS"],
                 ["tan-2.tan.cluster.lab"], ["nope.cluster.lab"], ["cluster.lab", "ANY"]):
        assert lab.records(*args, server=REPLICAS[0]) == lab.records(*args, server=REPLICAS[1])
    counters = lab.stop(0)
    assert counters["answered_local"] >= 16 and counters["tcp_connections"] >= 8
    assert "cache_miss" not in counters


def test_forwarding_caches_answers_counts_ttls_down_and_caches_negative_ones(dns_lab):
    lab = dns_lab()
    first = lab.records("www.example.test")
    assert first == ["www.example.test. 300 IN A 198.51.100.10"]
    time.sleep(2.1)       # the countdown needs whole seconds to pass; a lower bound only
    second = lab.records("www.example.test")
    assert second[0].split()[4] == "198.51.100.10" and 290 <= int(second[0].split()[1]) <= 298
    assert lab.upstream_queries(0, "www.example.test") == ["udp"]     # asked once
    assert lab.status("nx1.example.test") == "NXDOMAIN"
    negative = lab.records("nx1.example.test")
    assert negative[0].split()[3] == "SOA" and int(negative[0].split()[1]) <= 30
    assert lab.status("nx1.example.test") == "NXDOMAIN"
    assert lab.upstream_queries(0, "nx1.example.test") == ["udp"]
    counters = lab.stop()
    assert counters["cache_miss"] == 2 and counters["cache_hit"] == 3
    assert counters["upstream_answers"] == 2


def test_a_truncated_upstream_answer_is_fetched_again_over_tcp(dns_lab):
    lab = dns_lab()
    assert lab.records("tc.example.test") == ["tc.example.test. 300 IN A 198.51.100.10"]
    assert lab.upstream_queries(0, "tc.example.test") == ["udp", "tcp"]
    assert lab.stop()["upstream_tcp"] == 1


def test_a_dead_first_upstream_fails_over_to_the_second(dns_lab):
    lab = dns_lab(silent_first=True)
    assert lab.records("far.example.test") == ["far.example.test. 300 IN A 198.51.100.10"]
    assert lab.upstream_queries(0, "far.example.test") == ["udp"]       # asked, no answer
    assert lab.upstream_queries(1, "far.example.test") == ["udp"]
    counters = lab.stop()
    assert counters["upstream_timeout"] == 1 and "upstream_failed" not in counters


def test_spoofed_answers_and_out_of_bailiwick_records_are_not_cached(dns_lab):
    lab = dns_lab()
    for name in ("wrongid.example.test", "wrongq.example.test", "wrongsrc.example.test"):
        assert lab.records(name) == [f"{name}. 300 IN A 198.51.100.10"], name
        assert lab.records(name) == [f"{name}. 300 IN A 198.51.100.10"], name   # from cache
    bailiwick = lab.records("bailiwick.example.test")
    assert bailiwick == ["bailiwick.example.test. 300 IN A 198.51.100.10"]
    # The forged victim record was dropped: the victim's name is asked of the upstream.
    assert lab.records("victim.other.test") == ["victim.other.test. 300 IN A 198.51.100.77"]
    assert lab.upstream_queries(0, "victim.other.test") == ["udp"]
    counters = lab.stop()
    assert counters["upstream_mismatch"] == 2          # wrong ID, other question
    assert counters["upstream_wrong_source"] == 1
    assert counters["dropped_out_of_bailiwick"] == 1


FLOOD = """
import socket, dns.message
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{source}", 0))
data = dns.message.make_query("node1.cluster.lab", "A").to_wire()
for _ in range({count}):
    sock.sendto(data, ("{server}", 53))
"""


def test_a_flood_from_one_address_is_rate_limited_and_others_still_answered(dns_lab):
    lab = dns_lab(sets=("dns.rate_limit=50", "dns.rate_burst=50"))
    script = FLOOD.format(source=FLOODER, count=3000, server=REPLICAS[0])
    lab.client.run([sys.executable, "-c", script], timeout=60)
    assert lab.records("node2.cluster.lab") == ["node2.cluster.lab. 300 IN A 198.18.0.12"]
    garbage = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
               f"[s.sendto(b'\\x12\\x34\\x01\\x00\\xff\\xff' + bytes(8), ('{REPLICAS[0]}', 53))"
               " for _ in range(10)]")
    lab.client.run([sys.executable, "-c", garbage], timeout=60)
    assert lab.records("node3.cluster.lab") == ["node3.cluster.lab. 300 IN A 198.18.0.13"]
    counters = lab.stop()
    # 3000 sent in well under the 20 s it would take 50 a second to let 1000 through.
    assert counters["rate_limited"] >= 2000 and counters["formerr_counts_too_large"] == 10
