"""A gateway pair in network namespaces, for the heartbeat's lab tests and bench/failover.py.

    hub (bridge) --- primary 198.18.0.11 (ours or keepalived)
                 --- backup  198.18.0.12 (ours or keepalived)
                 --- client  198.18.0.200, default route via the VIP 198.18.0.254

A `Speaker` is one VRRP router in its namespace: ours (`vlx bootsvc run --services heartbeat`
with the pair's roles from the database) or keepalived (`-n -l -f CONF`, `vrrp_version 3`,
same VRID, interval and VIP). `probe` runs this module in the client namespace to time a
takeover: it pings the VIP every 5 ms and reports the first echo reply that comes from a
given MAC, read off an AF_PACKET socket (a plain ping cannot tell whose reply it got, and the
killed master's namespace still holds the VIP). Imports the model only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TypedDict, Unpack

from virtualinux.bootsvc.status import STATUS_FILE, read_status
from virtualinux.vvcm import Database, VlxError, changes, inventory
from virtualinux.vvcm.command import vlx_command

from .netns import Namespace, Netns
from .wait import wait_for

VIP = "198.18.0.254"
PRIMARY, BACKUP, CLIENT = "198.18.0.11", "198.18.0.12", "198.18.0.200"
MACS = {PRIMARY: "52:54:00:00:00:11", BACKUP: "52:54:00:00:00:12"}
VRID = 51
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"
VLX = vlx_command()


class PairSettings(TypedDict, total=False):
    """The settings a pair lab may set on top of the example's (typed for `replace`)."""

    gateway_uplink: str | None
    vrrp_track_uplink: bool
    vrrp_vmac: bool


def pair_database(path: Path, interval: float, **settings: Unpack[PairSettings]) -> Database:
    """The example cluster (node1 gateway-primary at .11, node2 gateway-backup at .12), with
    `settings` (gateway_uplink="up0", ...) on top."""
    db = Database.create(path)
    db.update("db import", "vrrp pair",
              lambda c: inventory.apply(c, inventory.load(EXAMPLE), str(EXAMPLE)))
    db.update("settings", f"vrrp every {interval} s", lambda c: changes.set_settings(
        c, dataclasses.replace(c.required_settings(), vrrp_interval=interval, **settings)))
    return db


def keepalived_config(priority: int, interval: float, interface: str = "eth0") -> str:
    return f"""global_defs {{
    vrrp_version 3
    script_user root
}}
vrrp_instance gateway {{
    state BACKUP
    interface {interface}
    virtual_router_id {VRID}
    priority {priority}
    advert_int {interval}
    virtual_ipaddress {{
        {VIP}/32
    }}
}}
"""


@dataclasses.dataclass
class Speaker:
    kind: str                     # "ours" or "keepalived"
    ns: Namespace
    address: str
    work: Path
    db_path: Path
    interval: float
    priority: int
    process: subprocess.Popen | None = None

    @property
    def mac(self) -> str:
        return MACS[self.address]

    @property
    def state_dir(self) -> Path:
        return self.work / f"state-{self.address}"

    @property
    def log(self) -> Path:
        return self.work / f"{self.kind}-{self.address}.log"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        if self.kind == "ours":
            (self.state_dir / STATUS_FILE).unlink(missing_ok=True)
            cmd = [*VLX, "--db", str(self.db_path), "bootsvc", "run", "--interface", "eth0",
                   "--address", self.address, "--services", "heartbeat", "--poll", "0.2",
                   "--state-dir", str(self.state_dir)]
        else:
            conf = self.work / f"keepalived-{self.address}.conf"
            conf.write_text(keepalived_config(self.priority, self.interval))
            # Private pid files: another keepalived on this machine must not see ours. Removed
            # first: after a SIGKILL they name pids the busy machine may have handed to
            # another process, and keepalived would then refuse ("daemon is already running").
            pid = self.work / f"keepalived-{self.address}"
            pid_files = [Path(f"{pid}{suffix}.pid") for suffix in ("", "-vrrp", "-check")]
            for path in pid_files:
                path.unlink(missing_ok=True)
            cmd = ["keepalived", "-n", "-l", "-D", "-P", "-f", str(conf),
                   "-p", str(pid_files[0]), "-r", str(pid_files[1]), "-c", str(pid_files[2])]
        with self.log.open("a") as log:
            self.process = self.ns.popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if self.kind == "ours":
            wait_for(lambda: (self.state_dir / STATUS_FILE).exists() or not self.running(),
                     30, f"{self.address} to start")
            assert self.running(), self.log.read_text()[-2000:]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, the whole process group (keepalived's VRRP child too): no goodbye."""
        if self.running():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def holds_vip(self) -> bool:
        """On eth0, or on the virtual MAC's macvlan."""
        return any(address.startswith(f"{VIP}/") for address in self.ns.ipv4_addresses())

    def drop_vip(self) -> None:
        """What a dead master leaves behind, removed before the next round of a bench."""
        self.ns.remove_address("eth0", f"{VIP}/32")

    def status(self) -> dict:
        """Ours only: the heartbeat's details and counters from the daemon's status file."""
        try:
            status = read_status(self.state_dir)
        except VlxError:
            return {}
        return {**status.details("heartbeat"), "counters": status.counters("heartbeat")}

    def state(self) -> str:
        """master or backup: ours says so; keepalived's is read off the VIP it holds."""
        if self.kind == "ours":
            return str(self.status().get("state", "")) if self.running() else "dead"
        if not self.running():
            return "dead"
        return "master" if self.holds_vip() else "backup"


class PairLab:
    def __init__(self, netns: Netns, work: Path, interval: float,
                 **settings: Unpack[PairSettings]):
        self.netns = netns
        self.work = work
        self.interval = interval
        self.db_path = work / "cluster.db"
        pair_database(self.db_path, interval, **settings)
        self.hub = netns.namespace("hub")
        self.bridge = netns.bridge(self.hub)
        self.client = netns.namespace("client")
        self.client_link = netns.plug(self.hub, self.bridge, self.client,
                                      address=f"{CLIENT}/24")
        self.client.default_route(VIP)
        self.namespaces = {}
        self.links = {}
        for address in (PRIMARY, BACKUP):
            ns = netns.namespace(f"g{address.rsplit('.', 1)[1]}")
            self.links[address] = netns.plug(self.hub, self.bridge, ns,
                                             address=f"{address}/24", mac=MACS[address])
            self.namespaces[address] = ns
        self.speakers: list[Speaker] = []

    def speaker(self, address: str, kind: str) -> Speaker:
        speaker = Speaker(kind, self.namespaces[address], address, self.work, self.db_path,
                          self.interval, 200 if address == PRIMARY else 100)
        self.speakers.append(speaker)
        return speaker

    def cut(self, address: str, up: bool) -> None:
        """Take the hub end of a speaker's link down (a partition) or up again (healed)."""
        self.hub.set_link(self.links[address], up)

    def close(self) -> None:
        for speaker in self.speakers:
            speaker.kill()


def start_probe(client: Namespace, mac: str, timeout: float) -> subprocess.Popen:
    """The prober in the client namespace; it prints `ready`, then `reply MONOTONIC`."""
    process = client.popen([sys.executable, "-m", "virtualinux.vm_test.vrrp_pair", mac,
                            str(timeout)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        process.kill()
        raise RuntimeError(f"prober did not start: {line!r}")
    return process


def probe_result(process: subprocess.Popen) -> float | None:
    """When the first reply from the MAC came (time.monotonic), None if none in time."""
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    process.wait(10)
    return float(line.split()[1]) if line.startswith("reply ") else None


def _probe(mac: str, timeout: float, interval: float = 0.005) -> None:
    wanted = bytes.fromhex(mac.replace(":", ""))
    vip = ipaddress.IPv4Address(VIP).packed
    ident = os.getpid() & 0xFFFF
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    listener = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    listener.bind(("eth0", 0x0800))
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    sequence = 0
    next_send = 0.0
    while (now := time.monotonic()) < deadline:
        if now >= next_send:
            sequence = (sequence + 1) & 0xFFFF
            sender.sendto(_echo(ident, sequence), (VIP, 0))
            next_send = now + interval
        ready, _, _ = select.select([listener], [], [], max(0.0, next_send - now))
        if not ready:
            continue
        frame, (_, _, pkttype, _, _) = listener.recvfrom(2048)
        if pkttype == socket.PACKET_OUTGOING or len(frame) < 42:
            continue
        header_length = (frame[14] & 0x0F) * 4
        icmp = frame[14 + header_length:]
        if (frame[6:12] == wanted and frame[23] == socket.IPPROTO_ICMP
                and frame[26:30] == vip and icmp[:1] == b"\0"
                and int.from_bytes(icmp[4:6], "big") == ident):
            print(f"reply {time.monotonic():.6f}", flush=True)
            return
    print("timeout", flush=True)


def _echo(ident: int, sequence: int) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, sequence)
    payload = b"vlx-failover"
    total = 0
    data = header + payload
    for i in range(0, len(data), 2):
        total += (data[i] << 8) + (data[i + 1] if i + 1 < len(data) else 0)
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    checksum = ~total & 0xFFFF
    return struct.pack("!BBHHH", 8, 0, checksum, ident, sequence) + payload


if __name__ == "__main__":
    _probe(sys.argv[1], float(sys.argv[2]))
