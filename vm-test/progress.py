"""How far each lab node has come in its boot, read from what the lab can see from outside.

    powered   QEMU runs
    dhcp      a replica logged `DHCPACK MAC -> IP NAME` for the node's MAC
    files     a replica logged a TFTP read (`RRQ ... from IP:`) or an HTTP request from the
              node's address (iPXE fetching its script, kernel or initrd)
    kernel    the serial console shows `Linux version`
    init      the serial console shows `virtualinux: node NAME up IP` (the lab image's /init)
    ready     the node answers a ping on its database address, from a replica's namespace

A node booting the node image (`node_phases(steps)`) goes from `kernel` on through

    iscsi     the initramfs logged in to its root's target (open-iscsi: `Connection1:0 to`)
    root      its root is mounted (the kernel's `EXT4-fs ... mounted filesystem`, or systemd's
              `Welcome to`)
    STEP      each start-up step's console line, `virtualinux: [NN STEP] ok|FAILED|skipped`
    serving   once every step has said how it went, its own replica answers HTTP (`serving`
              probe); a step that runs in a thread (the database's) may say so after later ones

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
_ISCSI_LINE = re.compile(r"Connection\d+:\d+ to \[target:|is operational now")
_ROOT_LINE = re.compile(r"EXT4-fs \(sd\w+\): mounted filesystem|Welcome to ")
_STEP_LINE = re.compile(r"virtualinux: \[\d+ ([\w-]+)\] (ok|FAILED|skipped)")
_KERNEL_LINE = "Linux version"
_FILE_REQUEST = re.compile(r"\b(RRQ|GET|HEAD)\b")


def node_phases(steps: Sequence[str]) -> tuple[str, ...]:
    """The phases of a node booting the node image whose start-up runs `steps`, in order."""
    return ("off", "powered", "dhcp", "files", "kernel", "iscsi", "root", *steps, "serving")


@dataclasses.dataclass
class NodeProgress:
    name: str
    mac: str
    ip: str
    phase: str = "off"
    seen: dict[str, float] = dataclasses.field(default_factory=dict)
    reported_ip: str | None = None
    phases: tuple[str, ...] = PHASES
    failed: list[str] = dataclasses.field(default_factory=list)   # start-up steps

    @property
    def wrong_address(self) -> bool:
        return self.reported_ip is not None and self.reported_ip != self.ip

    def reach(self, phase: str, when: float) -> bool:
        """Move on to `phase` if it is further than where the node is; True if it moved."""
        if phase not in self.phases:
            return False
        self.seen.setdefault(phase, when)
        if self.phases.index(phase) <= self.phases.index(self.phase):
            return False
        self.phase = phase
        return True

    @property
    def steps_done(self) -> bool:
        """Every start-up step has printed its line, in whatever order they came."""
        if "serving" not in self.phases:
            return False
        steps = self.phases[self.phases.index("root") + 1:-1]
        return all(step in self.seen for step in steps)

    def describe(self) -> str:
        if self.wrong_address:
            return f"init on {self.reported_ip}, not {self.ip}"
        if self.failed:
            return f"{self.phase} ({', '.join(self.failed)} FAILED)"
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
                 clock: Callable[[], float] = time.monotonic,
                 serving: Callable[[str], bool] | None = None):
        self.nodes = {node.name: node for node in nodes}
        self.serial = {name: LogTail(path) for name, path in serial_logs.items()}
        self.replicas = [LogTail(path) for path in replica_logs]
        self.ping = ping
        self.serving = serving
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
                self._node_image_line(node, line, reach)
        if self.serving is not None:
            for node in self.nodes.values():
                if node.phase != "serving" and node.steps_done and self.serving(node.ip):
                    reach(node, "serving")
        if self.ping is not None:
            for node in self.nodes.values():
                if node.phase == "init" and not node.wrong_address and self.ping(node.ip):
                    reach(node, "ready")
        return steps

    @staticmethod
    def _node_image_line(node: NodeProgress, line: str,
                         reach: Callable[[NodeProgress, str], None]) -> None:
        if _ISCSI_LINE.search(line):
            reach(node, "iscsi")
        elif _ROOT_LINE.search(line):
            reach(node, "root")
        else:
            match = _STEP_LINE.search(line)
            if match:
                if match.group(2) != "ok" and match.group(1) not in node.failed:
                    node.failed.append(match.group(1))
                reach(node, match.group(1))

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
        return all(node.phases.index(node.phase) >= node.phases.index(phase)
                   for node in self.nodes.values())


def http_from(netns_path: str, path: str = "boot.ipxe") -> Callable[[str], bool]:
    """Whether a node's replica answers: one HTTP GET of `path` (2 s at most), from inside
    the lab namespace at the path."""
    def answers(ip: str) -> bool:
        try:
            # curl, not busybox's wget: Debian's busybox wget segfaults on these hosts.
            done = subprocess.run(["nsenter", f"--net={netns_path}", "--", "curl", "-sf",
                                   "-m", "2", "-o", "/dev/null", f"http://{ip}/{path}"],
                                  capture_output=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0
    return answers


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
