"""The namespace registry over netlink (pyroute2): what it makes is there, visible to
`ip netns`, connected; errors are exceptions; close() removes everything, and no helper
process pyroute2 forks is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from virtualinux.vm_test.netns import NETNS_DIR, Netns

from .conftest import require

pytestmark = pytest.mark.lab


def children() -> list[int]:
    """Processes whose parent is this one, zombies included (an unreaped helper is a leak)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def test_segment_with_veths_addresses_and_a_tap_then_nothing_left():
    require("busybox")
    before = children()
    with Netns(prefix="vtn") as registry:
        hub = registry.namespace("hub")
        bridge = registry.bridge(hub)
        a, b = registry.namespace("a"), registry.namespace("b")
        registry.plug(hub, bridge, a, address="198.18.0.1/24", mac="52:54:00:aa:00:01")
        registry.plug(hub, bridge, b, address="198.18.0.2/24")
        hub.add_address(bridge, "198.18.0.254/24")
        registry.tap(hub, bridge, "tap0")
        names = [ns.name for ns in (hub, a, b)]
        assert all((NETNS_DIR / name).exists() for name in names)     # what `ip netns` lists
        assert hub.links("bridge") == ["br0"] and hub.links("tun") == ["tap0"]
        assert len(hub.links("veth")) == 2 and a.links("veth") == ["eth0"]
        with a.netlink() as ipr:
            (eth0,) = ipr.get_links(ifname="eth0")
            assert eth0.get("address") == "52:54:00:aa:00:01"
        assert a.run(["busybox", "ping", "-c", "1", "-W", "5", "198.18.0.2"]).returncode == 0
        assert b.run(["busybox", "ping", "-c", "1", "-W", "5", "198.18.0.254"]).returncode == 0
        sleeper = a.popen(["sleep", "600"])
    assert sleeper.wait(timeout=10) != 0            # killed by close()
    assert not any((NETNS_DIR / name).exists() for name in names)
    assert children() == before


def test_netlink_errors_are_exceptions(netns):
    ns = netns.namespace("x")
    with pytest.raises(NetlinkError):
        ns.add_address("nosuch0", "198.18.0.1/24")
    with pytest.raises(FileExistsError):
        netns.namespace("x")
    netns.bridge(ns, "br0")
    with pytest.raises(NetlinkError):
        netns.bridge(ns, "br0")
