"""Network namespaces with a clean-up registry, for the lab and for tests.

A `Netns` registry makes namespaces (named with its own prefix, so two runs never collide),
links them through a bridge (a "segment", like one switch), and on `close()` kills every
process left in them and deletes them: veths, taps and bridges go with their namespace.
Lab traffic stays inside: no namespace made here gets a route out.

Everything is done over rtnetlink with pyroute2, in this process: errors are exceptions
(`NetlinkError`, `OSError`), not parsed stderr. The namespaces are the ones `ip netns` knows
(/run/netns/NAME), so people can still look inside with it. pyroute2 opens a socket inside a
namespace (and makes a tap there) from a short-lived child process; `_netlink` closes every
such socket, and with it reaps the child, before it returns.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

NETNS_DIR = Path("/run/netns")


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

    @contextlib.contextmanager
    def netlink(self) -> Iterator[IPRoute]:
        """An rtnetlink socket inside this namespace (flags=0: never make a missing one)."""
        with IPRoute(netns=self.name, flags=0) as ipr:
            yield ipr

    def add_address(self, ifname: str, address: str) -> None:
        """`address` ("198.18.0.1/24") on `ifname`."""
        interface = ipaddress.ip_interface(address)
        with self.netlink() as ipr:
            ipr.addr("add", index=_index(ipr, ifname), address=str(interface.ip),
                     prefixlen=interface.network.prefixlen)

    def remove_address(self, ifname: str, address: str) -> bool:
        """Take `address` ("198.18.0.254/32") off `ifname`; False if it was not there."""
        interface = ipaddress.ip_interface(address)
        with self.netlink() as ipr:
            try:
                ipr.addr("del", index=_index(ipr, ifname), address=str(interface.ip),
                         prefixlen=interface.network.prefixlen)
            except NetlinkError as err:
                if err.code == errno.EADDRNOTAVAIL:
                    return False
                raise
        return True

    def ipv4_addresses(self) -> list[str]:
        """Every IPv4 address here, with its prefix ("198.18.0.254/32")."""
        with self.netlink() as ipr:
            return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                    for a in ipr.get_addr(family=socket.AF_INET)]

    def set_link(self, ifname: str, up: bool) -> None:
        with self.netlink() as ipr:
            ipr.link("set", index=_index(ipr, ifname), state="up" if up else "down")

    def default_route(self, gateway: str) -> None:
        """A default route via `gateway` (an address on one of this namespace's links)."""
        with self.netlink() as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway)

    def links(self, kind: str | None = None) -> list[str]:
        """The names of the links here, of one kind ("tun", "veth", "bridge") if given."""
        with self.netlink() as ipr:
            return [link.get("ifname") for link in ipr.get_links()
                    if kind is None or link.get(("linkinfo", "kind")) == kind]

    def pids(self) -> list[int]:
        return pyroute2_netns.ns_pids().get(self.name, [])


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkError(errno.ENODEV, f"no link {ifname!r}")
    return found[0]


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
        if name in pyroute2_netns.listnetns():
            raise FileExistsError(errno.EEXIST, "namespace exists already", name)
        pyroute2_netns.create(name)
        ns = Namespace(name)
        self.namespaces.append(ns)
        with ns.netlink() as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")
        return ns

    def bridge(self, ns: Namespace, name: str = "br0") -> str:
        with ns.netlink() as ipr:
            ipr.link("add", ifname=name, kind="bridge", br_forward_delay=0)
            ipr.link("set", index=_index(ipr, name), state="up")
        return name

    def plug(self, hub: Namespace, bridge: str, ns: Namespace, ifname: str = "eth0",
             address: str | None = None, mac: str | None = None) -> str:
        """A veth from `ns` (named `ifname`) into `bridge` in `hub`; returns the hub end."""
        self._links += 1
        # Both ends start with names unique on the machine: a name taken in either
        # namespace (two replicas' eth0) would refuse the pair.
        outer = f"v{self._links}{uuid.uuid4().hex[:6]}"
        inner = f"i{self._links}{uuid.uuid4().hex[:6]}"
        with hub.netlink() as ipr:
            ipr.link("add", ifname=outer, kind="veth", peer=inner)
            ipr.link("set", index=_index(ipr, inner), net_ns_fd=ns.name)
            ipr.link("set", index=_index(ipr, outer), master=_index(ipr, bridge), state="up")
        with ns.netlink() as ipr:
            index = _index(ipr, inner)
            ipr.link("set", index=index, ifname=ifname)
            if mac:
                ipr.link("set", index=index, address=mac)
            if address:
                interface = ipaddress.ip_interface(address)
                ipr.addr("add", index=index, address=str(interface.ip),
                         prefixlen=interface.network.prefixlen)
            ipr.link("set", index=index, state="up")
        return outer

    def tap(self, hub: Namespace, bridge: str, name: str) -> str:
        """A persistent tap device `name` in `hub`, enslaved to `bridge` (QEMU opens it)."""
        with hub.netlink() as ipr:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            ipr.link("set", index=_index(ipr, name), master=_index(ipr, bridge), state="up")
        return name

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            remove_namespace(ns.name)
        self.namespaces.clear()


def remove_namespace(name: str) -> None:
    """Kill what runs in namespace `name`, then delete it (its links go with it)."""
    kill_all(Namespace(name))
    with contextlib.suppress(FileNotFoundError):
        pyroute2_netns.remove(name)


def kill_all(ns: Namespace, grace: float = 3.0) -> None:
    """SIGTERM everything in `ns`, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = ns.pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and ns.pids():
            time.sleep(0.05)
