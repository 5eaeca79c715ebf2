"""How far each lab node has come in its boot, read from what the lab can see from outside.

    powered   QEMU runs
    dhcp      a replica logged `DHCPACK MAC -> IP NAME` for the node's MAC
    files     a replica logged a TFTP read (`RRQ ... from IP:`) or an HTTP request from the
              node's address (iPXE fetching its script, kernel or initrd)
    kernel    the serial console shows `Linux version`
    init      the serial console shows `virtualinux: node NAME up IP` (the lab image's /init)
    ready     the node answers a ping on its database address, from a replica's namespace

Logs are read incrementally (each poll reads only what was appended). A phase never goes back:
a node that reboots after a failed transfer is shown at the furthest phase it has reached,
and the times say when each phase was first seen. The /init line's address is compared with
the database's: a node that came up on another address is never `ready`.

Imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PHASES = ("off", "powered", "dhcp", "files", "kernel", "init", "ready")
_INIT_LINE = re.compile(r"virtualinux: node (\S+) up (\S+)")
_KERNEL_LINE = "Linux version"
_FILE_REQUEST = re.compile(r"\b(RRQ|GET|HEAD)\b")


@dataclasses.dataclass
class NodeProgress:
    name: str
    mac: str
    ip: str
    phase: str = "off"
    seen: dict[str, float] = dataclasses.field(default_factory=dict)
    reported_ip: str | None = None

    @property
    def wrong_address(self) -> bool:
        return self.reported_ip is not None and self.reported_ip != self.ip

    def reach(self, phase: str, when: float) -> bool:
        """Move on to `phase` if it is further than where the node is; True if it moved."""
        self.seen.setdefault(phase, when)
        if PHASES.index(phase) <= PHASES.index(self.phase):
            return False
        self.phase = phase
        return True

    def describe(self) -> str:
        if self.wrong_address:
            return f"init on {self.reported_ip}, not {self.ip}"
        return self.phase


class LogTail:
    """The lines appended to a file since the last call (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        text = self.partial + data.decode("utf-8", "replace").replace("\r", "\n")
        *complete, self.partial = text.split("\n")
        return complete


def _address_pattern(ip: str) -> re.Pattern[str]:
    # 198.18.0.1 must not match inside 198.18.0.11.
    return re.compile(rf"(?<![0-9.]){re.escape(ip)}(?![0-9])")


class Watcher:
    """Polls the replicas' logs and the nodes' serial logs; `poll()` returns what moved."""

    def __init__(self, nodes: Sequence[NodeProgress], serial_logs: dict[str, Path],
                 replica_logs: Sequence[Path], ping: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.nodes = {node.name: node for node in nodes}
        self.serial = {name: LogTail(path) for name, path in serial_logs.items()}
        self.replicas = [LogTail(path) for path in replica_logs]
        self.ping = ping
        self.clock = clock
        self._dhcp = {node.mac.lower(): node for node in nodes}
        self._addresses = [(_address_pattern(node.ip), node) for node in nodes]

    def power_on(self, name: str, when: float | None = None) -> None:
        node = self.nodes[name]
        node.seen["powered"] = self.clock() if when is None else when
        node.reach("powered", node.seen["powered"])

    def poll(self) -> list[tuple[NodeProgress, str]]:
        """Read what is new; the (node, phase) steps it made, in the order they happened."""
        now = self.clock()
        steps: list[tuple[NodeProgress, str]] = []

        def reach(node: NodeProgress, phase: str) -> None:
            if node.reach(phase, now):
                steps.append((node, phase))

        for tail in self.replicas:
            for line in tail.lines():
                self._replica_line(line, reach)
        for name, tail in self.serial.items():
            node = self.nodes[name]
            for line in tail.lines():
                if _KERNEL_LINE in line:
                    reach(node, "kernel")
                match = _INIT_LINE.search(line)
                if match and match.group(1) == node.name:
                    node.reported_ip = match.group(2)
                    reach(node, "init")
        if self.ping is not None:
            for node in self.nodes.values():
                if node.phase == "init" and not node.wrong_address and self.ping(node.ip):
                    reach(node, "ready")
        return steps

    def _replica_line(self, line: str,
                      reach: Callable[[NodeProgress, str], None]) -> None:
        if "DHCPACK" in line:
            for word in line.split():
                node = self._dhcp.get(word.lower())
                if node is not None:
                    reach(node, "dhcp")
                    return
        if _FILE_REQUEST.search(line):
            for pattern, node in self._addresses:
                if pattern.search(line):
                    reach(node, "files")
                    return

    def all_at(self, phase: str) -> bool:
        want = PHASES.index(phase)
        return all(PHASES.index(node.phase) >= want for node in self.nodes.values())


def ping_from(netns_path: str) -> Callable[[str], bool]:
    """One ICMP echo with a one-second wait, sent from inside the lab namespace at the path."""
    def ping(ip: str) -> bool:
        try:
            done = subprocess.run(["nsenter", f"--net={netns_path}", "--", "busybox", "ping",
                                   "-c", "1", "-W", "1", ip],
                                  capture_output=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0
    return ping
