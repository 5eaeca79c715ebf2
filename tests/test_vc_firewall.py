"""The firewall of VC bridges as rendered: the golden nft script of a VC from the example
inventory, the script without a service address, and hostile names or addresses refused before
anything reaches nft. Live behaviour is in tests/test_vc_firewall_lab.py."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess

import pytest
from virtualinux.vvcm import VlxError, inventory
from virtualinux.vvcm.model import Cluster
from virtualinux.vvcm.virt import firewall, network

from .conftest import EXAMPLE
from .test_hostile_values import HOSTILE

GREEN = """\
add table inet vlx_vc_green
delete table inet vlx_vc_green
table inet vlx_vc_green {
  counter to_node {}
  counter routed {}
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "vlxbr103" jump from_vms
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    # frames bridged within the VC (seen here only with br_netfilter loaded)
    iifname "vlxbr103" oifname "vlxbr103" accept
    # a VC is private: nothing routed out of it or into it
    iifname "vlxbr103" counter name "routed" drop
    oifname "vlxbr103" counter name "routed" drop
  }
  chain from_vms {
    # DHCP: DISCOVER and REQUEST broadcast, renewals to the server (the service address)
    ip daddr { 255.255.255.255, 198.19.3.254 } udp sport 68 udp dport 67 accept
    # DNS on the service address
    ip daddr 198.19.3.254 meta l4proto { tcp, udp } th dport 53 accept
    # neighbour discovery (ARP is not IP: it never reaches this table)
    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
    counter name "to_node" drop
  }
}
"""


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return inventory.apply(Cluster(generation=0, settings=None), inventory.load(EXAMPLE), "t")


def green_plan(cluster: Cluster) -> network.NodePlan:
    return network.node_plans(cluster, "green", network.hosting_nodes(cluster, "green"))[0]


def test_green_ruleset_is_the_golden_text(cluster):
    rules = green_plan(cluster).firewall()
    assert rules == firewall.VcFirewall(vc="green", bridge="vlxbr103",
                                        service=ipaddress.IPv4Address("198.19.3.254"))
    assert firewall.ruleset(rules) == GREEN


def test_every_hosting_node_filters_the_same_way(cluster):
    plans = network.node_plans(cluster, "green", [node.name for node in cluster.nodes])
    assert len({firewall.ruleset(plan.firewall()) for plan in plans}) == 1


def test_without_a_service_address_nothing_of_the_node_is_reachable():
    script = firewall.ruleset(firewall.VcFirewall(vc="tiny", bridge="vlxbrv7"))
    assert "dport 67" not in script and "dport 53" not in script
    body = script.split("chain from_vms {")[1]
    assert body.split("\n")[1:4] == [
        "    # neighbour discovery (ARP is not IP: it never reaches this table)",
        "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
        '    counter name "to_node" drop']
    assert 'iifname "vlxbrv7" jump from_vms' in script


def test_removal_creates_then_deletes_so_it_never_fails():
    assert firewall.removal("green") == ("add table inet vlx_vc_green\n"
                                         "delete table inet vlx_vc_green\n")


@pytest.mark.parametrize("value", HOSTILE + ["Green", "-a", "a" * 64, "", "vlx_vc_a"])
def test_a_hostile_vc_name_never_reaches_nft(cluster, value, monkeypatch):
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    plan = dataclasses.replace(green_plan(cluster), vc=value)
    with pytest.raises(VlxError, match="cannot name a firewall table"):
        plan.firewall()
    for call in (firewall.removal, lambda vc: firewall.remove(vc, "vt-none", "node1"),
                 lambda vc: firewall.dropped(vc, "vt-none", "node1"),
                 lambda vc: network.remove(dataclasses.replace(plan, netns="vt-none"))):
        with pytest.raises(VlxError, match="cannot name a firewall table"):
            call(value)
    with pytest.raises(VlxError, match="cannot name a firewall table"):
        network.ensure(dataclasses.replace(plan, netns="vt-none"))
    assert ran == []


@pytest.mark.parametrize("value", HOSTILE + ['vlxbr1" accept', "eth0", "vlxbr", "vlxbr1 "])
def test_a_hostile_bridge_name_is_refused(value):
    with pytest.raises(VlxError, match="is not a VC bridge name"):
        firewall.VcFirewall(vc="green", bridge=value)


@pytest.mark.parametrize("value", ["198.19.3.254; accept", "::1", 3])
def test_a_service_address_must_be_an_ipv4_address(value):
    with pytest.raises(VlxError, match="is not an IPv4 address"):
        firewall.VcFirewall(vc="green", bridge="vlxbr103", service=value)
