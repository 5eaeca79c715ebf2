"""The firewall of a VC's bridge on a node: what a VM may reach of the node that hosts it.

A VM shares a layer-2 segment with the other VMs of its VC (the bridge, and through the VXLAN
or VLAN device the VC's bridges on the other hosting nodes); of the node itself it may reach
only the boot services meant for it: DHCP (UDP 68 -> 67, to the broadcast or the VC's service
address) and DNS on the service address (UDP and TCP 53), plus IPv6 neighbour discovery. ARP
is not IP and passes (the inet family never sees it), so a VM resolves the service address;
an ARP answer for another address of the node leads nowhere, since IP to it is dropped here.
Everything else from the bridge to the node is dropped: its cluster address, SSH, etcd, tgt,
libvirt, the VIP, the service address's other ports, its IPv6 link-local address.

Nothing is routed out of a VC or into one: VC networks are private (DHCP gives VMs no router),
so the forward hook drops what arrives on the bridge for elsewhere and what would be routed
onto it, also where a node forwards (the gateway), also IPv6, whatever the bridge's forwarding
sysctl says. Frames bridged between the VC's own ports never reach these hooks, unless
br_netfilter is loaded: then they show as forwarded from the bridge to itself, and are let
through first.

One nftables table per VC and node, `vlx_vc_NAME` in the inet family, with an input and a
forward chain that match the bridge by name (`iifname`), so the table can exist before the
bridge does: vvcm.virt.network makes it before the bridge and removes it after. Applied with
the `nft` command, like the gateway's NAT (bootsvc/gateway_net.py: nft is the one tool that
speaks nftables' transactions; pyroute2's nftables support is experimental), in one transaction
that replaces whatever table of that name a killed predecessor left. The named counters
`to_node` and `routed` count what was dropped.

`ruleset()` is pure (golden-tested); every value that reaches it is checked first, so a
hostile VC or bridge name is refused with one line and never reaches nft. Imports the model's
name parser and vvcm.host only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shutil
import subprocess

from ..errors import VlxError
from ..fields import parse_name
from ..host import in_netns

TABLE_PREFIX = "vlx_vc_"
FAMILY = "inet"
NFT_TIMEOUT = 30.0
COUNTERS = ("to_node", "routed")
# A bridge this module filters: the names vvcm.virt.domain.bridge_name gives.
_BRIDGE = re.compile(r"vlxbrv?[0-9]{1,8}")


@dataclasses.dataclass(frozen=True)
class VcFirewall:
    """What one node filters for one VC: its bridge, and the service address on it."""

    vc: str
    bridge: str
    service: ipaddress.IPv4Address | None = None

    def __post_init__(self) -> None:
        checked_table(self.vc)
        if not isinstance(self.bridge, str) or not _BRIDGE.fullmatch(self.bridge):
            raise VlxError(f"VC {self.vc}: {self.bridge!r} is not a VC bridge name "
                           "(vlxbrID or vlxbrvID)")
        if self.service is not None and not isinstance(self.service, ipaddress.IPv4Address):
            raise VlxError(f"VC {self.vc}: service address {self.service!r} is not an IPv4 "
                           "address")

    @property
    def table(self) -> str:
        return table_name(self.vc)


def table_name(vc: str) -> str:
    """The VC's table (a DNS label, so letters, digits and '-': an nft identifier as is)."""
    return f"{TABLE_PREFIX}{vc}"


def checked_table(vc: str) -> str:
    """The VC's table, once the name is known to be a DNS label (one line if not)."""
    try:
        parse_name(vc)
    except ValueError as err:
        raise VlxError(f"VC name {vc!r} cannot name a firewall table: {err}") from None
    return table_name(vc)


def ruleset(rules: VcFirewall) -> str:
    """The nft script that (re)defines the VC's table in one transaction: created first, so
    the delete never fails, then deleted, then defined afresh (what a killed run left goes)."""
    bridge = f'"{rules.bridge}"'
    to_node = [f"iifname {bridge} jump from_vms"]
    allowed = []
    if rules.service is not None:
        service = str(rules.service)
        allowed += [
            "# DHCP: DISCOVER and REQUEST broadcast, renewals to the server (the service address)",
            f"ip daddr {{ 255.255.255.255, {service} }} udp sport 68 udp dport 67 accept",
            "# DNS on the service address",
            f"ip daddr {service} meta l4proto {{ tcp, udp }} th dport 53 accept",
        ]
    allowed += [
        "# neighbour discovery (ARP is not IP: it never reaches this table)",
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
        'counter name "to_node" drop',
    ]
    forward = [
        "# frames bridged within the VC (seen here only with br_netfilter loaded)",
        f"iifname {bridge} oifname {bridge} accept",
        "# a VC is private: nothing routed out of it or into it",
        f'iifname {bridge} counter name "routed" drop',
        f'oifname {bridge} counter name "routed" drop',
    ]
    table = f"{FAMILY} {rules.table}"
    lines = [f"add table {table}", f"delete table {table}", f"table {table} {{"]
    lines += [f"  counter {name} {{}}" for name in COUNTERS]
    lines += _chain("input", "type filter hook input priority filter; policy accept;", to_node)
    lines += _chain("forward", "type filter hook forward priority filter; policy accept;",
                    forward)
    lines += _chain("from_vms", None, allowed)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _chain(name: str, hook: str | None, rules: list[str]) -> list[str]:
    body = ([hook] if hook else []) + rules
    return [f"  chain {name} {{", *(f"    {line}" for line in body), "  }"]


def removal(vc: str) -> str:
    """The nft script that removes the VC's table, quietly if it is not there."""
    table = f"{FAMILY} {checked_table(vc)}"
    return f"add table {table}\ndelete table {table}\n"


def ensure(rules: VcFirewall, netns: str | None, node: str) -> None:
    """Define the VC's table on the node (its lab namespace, or this host), replacing any."""
    _nft(ruleset(rules), netns, node)


def remove(vc: str, netns: str | None, node: str) -> bool:
    """Remove the VC's table from the node; whether it was there."""
    script = removal(vc)
    present = table_name(vc) in tables(netns, node)
    _nft(script, netns, node)
    return present


def tables(netns: str | None, node: str) -> list[str]:
    """The VC tables (`vlx_vc_*`, inet) on the node."""
    listed = json.loads(_nft_run(["-j", "list", "tables", FAMILY], "", netns, node) or "{}")
    return sorted(item["table"]["name"] for item in listed.get("nftables", [])
                  if "table" in item and item["table"].get("family") == FAMILY
                  and item["table"].get("name", "").startswith(TABLE_PREFIX))


def remove_stale(keep: set[str], netns: str | None, node: str) -> list[str]:
    """Remove the VC tables of VCs not in `keep` (VCs gone from the node, or a killed run's
    leftovers); returns the tables removed."""
    stale = [name for name in tables(netns, node)
             if name.removeprefix(TABLE_PREFIX) not in keep and _ours(name)]
    for name in stale:
        _nft(removal(name.removeprefix(TABLE_PREFIX)), netns, node)
    return stale


def _ours(table: str) -> bool:
    """Whether `table` is one this module names (a table someone else named `vlx_vc_...`
    that is no VC name is left alone)."""
    try:
        parse_name(table.removeprefix(TABLE_PREFIX))
    except ValueError:
        return False
    return True


def dropped(vc: str, netns: str | None, node: str) -> dict[str, int]:
    """Packets dropped so far by the VC's table on the node: {"to_node": N, "routed": M}."""
    listed = json.loads(_nft_run(["-j", "list", "counters", "table", FAMILY,
                                  checked_table(vc)], "", netns, node))
    return {item["counter"]["name"]: item["counter"]["packets"]
            for item in listed.get("nftables", []) if "counter" in item}


def _nft(script: str, netns: str | None, node: str) -> None:
    _nft_run(["-f", "-"], script, netns, node)


def _nft_run(args: list[str], script: str, netns: str | None, node: str) -> str:
    if shutil.which("nft") is None:
        raise VlxError(f"node {node}: no `nft` command here to filter VC bridges with "
                       "(Debian package nftables)")
    command = ["nft", *args]
    try:
        done = subprocess.run(in_netns(netns, command) if netns else command, input=script,
                              capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise VlxError(f"node {node}: nft {' '.join(args)} did not finish in "
                       f"{NFT_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        said = " ".join(done.stderr.split())[:400]
        raise VlxError(f"node {node}: nft {' '.join(args)} failed: {said}")
    return done.stdout
