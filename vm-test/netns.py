"""Network namespaces with a clean-up registry, for the lab and for tests.

A `Netns` registry makes namespaces (named with its own prefix, so two runs never collide),
links them through a bridge (a "segment", like one switch), and on `close()` kills every
process left in them and deletes them: veths, taps and bridges go with their namespace.
Lab traffic stays inside: no namespace made here gets a route out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


def ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Namespace:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def prefix(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` run with this namespace's network but the caller's mounts (see LAB.md:
        `ip netns exec` would hide file systems mounted later)."""
        return ["nsenter", f"--net={self.path}", "--"] + list(cmd)

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.prefix(cmd), check=check, timeout=timeout, **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.prefix(cmd), **kwargs)

    def ip(self, *args: str) -> None:
        ip(*args, netns=self.name)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid in out.split()]


class Netns:
    """Makes namespaces and links; `close()` removes all of them and what runs inside."""

    def __init__(self, prefix: str = "vlx", unique: bool = True):
        # unique=False: the caller owns `prefix` and makes sure no one else uses it (the lab,
        # whose namespace names must be known to `vlx lab down` from its state directory).
        self.prefix = f"{prefix}{uuid.uuid4().hex[:6]}" if unique else prefix
        self.namespaces: list[Namespace] = []
        self._links = 0

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, role: str) -> Namespace:
        name = f"{self.prefix}-{role}"
        ip("netns", "add", name)
        ns = Namespace(name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def bridge(self, ns: Namespace, name: str = "br0") -> str:
        ns.ip("link", "add", name, "type", "bridge", "forward_delay", "0")
        ns.ip("link", "set", name, "up")
        return name

    def plug(self, hub: Namespace, bridge: str, ns: Namespace, ifname: str = "eth0",
             address: str | None = None, mac: str | None = None) -> str:
        """A veth from `ns` (named `ifname`) into `bridge` in `hub`; returns the hub end."""
        self._links += 1
        outer = f"v{self._links}{uuid.uuid4().hex[:6]}"
        inner_tmp = f"i{self._links}{uuid.uuid4().hex[:6]}"
        ip("link", "add", outer, "netns", hub.name, "type", "veth", "peer", "name", inner_tmp,
           "netns", ns.name)
        ns.ip("link", "set", inner_tmp, "name", ifname)
        if mac:
            ns.ip("link", "set", ifname, "address", mac)
        hub.ip("link", "set", outer, "master", bridge)
        hub.ip("link", "set", outer, "up")
        if address:
            ns.ip("addr", "add", address, "dev", ifname)
        ns.ip("link", "set", ifname, "up")
        return outer

    def tap(self, hub: Namespace, bridge: str, name: str) -> str:
        """A persistent tap device `name` in `hub`, enslaved to `bridge` (QEMU opens it)."""
        hub.ip("tuntap", "add", "dev", name, "mode", "tap")
        hub.ip("link", "set", name, "master", bridge)
        hub.ip("link", "set", name, "up")
        return name

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            kill_all(ns)
            subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True)
        self.namespaces.clear()


def kill_all(ns: Namespace, grace: float = 3.0) -> None:
    """SIGTERM everything in `ns`, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = ns.pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and ns.pids():
            time.sleep(0.05)
