"""45 uplink: a gateway node's address on the link that leads out of the cluster.

The nodes with role gateway-primary or gateway-backup hold the cluster's way out: the VRRP
master of the two masquerades the cluster network out of `gateway_uplink` (bootsvc.heartbeat,
started by step 50). Here that link comes up with the node's `uplink_address` from the
database (pyroute2, over netlink), and any other IPv4 address on it goes, so the link holds
exactly what the database says after every boot and every start-up run. A gateway node whose
uplink the database names but that has no such link fails the step in one line (its
heartbeat still runs: the VIP is held, only the NAT has nowhere to go).

Without `live` (a root directory in tests, an image being prepared) it only says what the node
would hold. Nodes that are not of the gateway pair, or a cluster with no uplink, touch nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from ..startup import Boot, Step, StepFailed


def run(boot: Boot) -> str:
    settings = boot.cluster.settings
    node = boot.node
    if not node.is_gateway:
        return "not a gateway node (no uplink)"
    uplink = settings.gateway_uplink if settings else None
    if not uplink:
        return "the cluster names no gateway_uplink: the gateway holds the VIP only"
    address = node.uplink_address
    if address is None:
        raise StepFailed(f"{node.name} is a gateway node but has no uplink_address for "
                         f"{uplink} in the database")
    if not boot.live:
        return f"would hold {address} on {uplink} (not live: nothing made)"
    return f"{uplink} up with {address}{configure(uplink, address, node.ip)}"


def configure(uplink: str, address: ipaddress.IPv4Interface,
              cluster_ip: ipaddress.IPv4Address | None = None) -> str:
    """`uplink` up holding `address` and no other IPv4 address; what changed, as a suffix.
    A link holding `cluster_ip` (the node's cluster address) is the cluster interface, named
    as the uplink by mistake: it is refused before anything is removed from it, or the node
    would cut itself off its cluster network."""
    # Imported when netlink is used, not when the steps are found (`--list`, tests): pyroute2
    # imports all of itself, ~2 s of a TCG node's CPU (vvcm.virt.network does the same).
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=uplink)
        if not found:
            raise StepFailed(f"no link {uplink} (gateway_uplink) on this node")
        index = found[0]
        held_now = ipr.get_addr(index=index, family=socket.AF_INET)
        if cluster_ip is not None and any(entry.get("IFA_ADDRESS") == str(cluster_ip)
                                          for entry in held_now):
            raise StepFailed(f"{uplink} (gateway_uplink) holds this node's cluster address "
                             f"{cluster_ip}: it is the cluster interface, not an uplink; "
                             "nothing changed")
        removed = []
        held = False
        for entry in held_now:
            ip, prefixlen = entry.get("IFA_ADDRESS"), entry["prefixlen"]
            if ip == str(address.ip) and prefixlen == address.network.prefixlen:
                held = True
                continue
            ipr.addr("del", index=index, address=ip, prefixlen=prefixlen)
            removed.append(f"{ip}/{prefixlen}")
        ipr.link("set", index=index, state="up")
        if not held:
            try:
                ipr.addr("add", index=index, address=str(address.ip),
                         prefixlen=address.network.prefixlen)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise StepFailed(f"adding {address} to {uplink}: {err}") from None
    if removed:
        return f" (removed {', '.join(removed)})"
    return " (unchanged)" if held else ""


STEP = Step(name="uplink", order=45, run=run, needs=("identity",),
            makes="gateway_uplink up with this gateway node's uplink_address")
