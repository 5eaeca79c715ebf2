"""Deterministic allocation of VM names, MACs, IPs and VC network ids.

Everything here is a pure function of names and of what the cluster already holds, so two
nodes that compute it from the same generation agree without talking to each other.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from .errors import VlxError

VXLAN_FIRST = 100


def vm_name(vc: str, index: int) -> str:
    return f"{vc}-{index}"


def vm_mac(vc: str, vm: str, taken: set[str]) -> str:
    """A locally administered unicast MAC derived from the VC and VM name.

    A clash with a MAC already taken (astronomically rare) is resolved by hashing again with a
    counter, which is still deterministic for a given database.
    """
    for attempt in range(1000):
        digest = hashlib.sha256(f"virtualinux/{vc}/{vm}/{attempt}".encode()).digest()
        # 0x02: locally administered, unicast.
        octets = bytes([0x02]) + digest[:5]
        mac = ":".join(f"{b:02x}" for b in octets)
        if mac not in taken:
            return mac
    raise VlxError(f"cannot derive a free MAC for {vm}")


def vm_addresses(network: ipaddress.IPv4Network, count: int,
                 reserved: Iterable[ipaddress.IPv4Address] = ()) -> list[ipaddress.IPv4Address]:
    """The first `count` host addresses of the VC network, in order, skipping `reserved`."""
    skip = set(reserved)
    out = []
    for address in network.hosts():
        if address in skip:
            continue
        out.append(address)
        if len(out) == count:
            return out
    raise VlxError(f"{count} VMs do not fit in {network} ({len(out)} addresses free)")


def service_address(network: ipaddress.IPv4Network) -> ipaddress.IPv4Interface | None:
    """Where the boot services answer a VC's VMs (DHCP, DNS): the last host address of its
    network, with the network's prefix, on the VC's bridge of every hosting node. VMs take
    addresses from the first host up and never this one. None for a /31 or /32 (no room)."""
    if network.prefixlen > 30:
        return None
    return ipaddress.IPv4Interface(f"{network.broadcast_address - 1}/{network.prefixlen}")


def free_vxlan_id(taken: Iterable[int]) -> int:
    used = set(taken)
    vni = VXLAN_FIRST
    while vni in used:
        vni += 1
    return vni
