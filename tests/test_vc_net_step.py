"""The start-up step `vcnet`: a node builds its part of the networks of the VCs with VMs placed
on it, idempotently, and removes those of VCs that left; without `live` it only says what it
would hold. The live runs are real netlink in a namespace standing for the node."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from virtualinux.initscripts import startup
from virtualinux.initscripts.steps import vcnet
from virtualinux.vvcm import changes, inventory
from virtualinux.vvcm.model import VirtualCluster
from virtualinux.vvcm.virt import network

from .conftest import EXAMPLE


@pytest.fixture
def cluster(db):
    return db.update("db import", "test",
                     lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))


def as_netns(cluster, node: str, netns: str):
    """The cluster with `node` in namespace `netns` (as the lab's nodes are)."""
    nodes = tuple(dataclasses.replace(n, netns=netns) if n.name == node else n
                  for n in cluster.nodes)
    return dataclasses.replace(cluster, nodes=nodes)


def test_plans_for_a_node_are_its_vcs_peered_with_their_other_hosts(cluster):
    for node in cluster.nodes:
        plans = network.plans_for_node(cluster, node.name)
        hosted = {vm.vc for vm in cluster.vms_on(node.name)}
        assert {plan.bridge for plan in plans} == {
            f"vlxbr{cluster.vc(vc).vxlan}" for vc in hosted}
        for plan in plans:
            vc = next(v for v in cluster.vcs if f"vlxbr{v.vxlan}" == plan.bridge)
            assert set(plan.peers) == {str(cluster.node(n).ip) for n in network.hosting_nodes(
                cluster, vc.name) if n != node.name}
            assert plan.address == str(network.service_address(vc))


def test_not_live_says_what_it_would_hold_and_makes_nothing(cluster, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    boot = startup.Boot(node=cluster.node("node1"), cluster=cluster, root=root)
    line = vcnet.run(boot)
    assert line.startswith("would hold vlxbr") and "not live" in line
    assert list(root.iterdir()) == []


@pytest.mark.lab
def test_live_step_builds_its_vcs_once_and_removes_those_that_left(cluster, netns):
    ns = netns.namespace("node1")
    hub = netns.namespace("hub")
    netns.plug(hub, netns.bridge(hub), ns, address="198.18.0.11/24")
    here = as_netns(cluster, "node1", ns.name)
    node = here.node("node1")
    plans = network.plans_for_node(here, "node1")
    assert plans, "the example places VMs on node1"
    boot = startup.Boot(node=node, cluster=here, live=True)

    first = vcnet.run(boot)
    assert "made " in first
    links = set(ns.links())
    for plan in plans:
        assert {plan.bridge, plan.tunnel} <= links
        assert network.bridge_addresses(plan) == [plan.address]
        assert sorted(network.peers_of(plan)) == sorted(plan.peers)
        assert not network.forwarding(plan)
    assert vcnet.run(boot).endswith("(unchanged)")

    # A VC that has left the node (here: gone from the database) is taken down; a new one
    # placed on it comes up.
    gone = plans[0]
    vc_gone = next(vc.name for vc in here.vcs if network.node_plans(
        here, vc.name, ["node1"])[0].bridge == gone.bridge)
    later = changes.remove_vc(here, vc_gone)
    later = changes.define_vc(later, VirtualCluster(
        name="lime", vms=1, vcpus=1, memory=64, cidr=ipaddress.IPv4Network("198.19.9.0/24")),
        placement={"lime-1": "node1"})
    line = vcnet.run(dataclasses.replace(boot, cluster=later))
    assert f"removed stale {gone.tunnel}, {gone.bridge}" in line
    links = set(ns.links())
    assert gone.bridge not in links and gone.tunnel not in links
    lime = network.node_plans(later, "lime", ["node1"])[0]
    assert {lime.bridge, lime.tunnel} <= links
    assert network.bridge_addresses(lime) == ["198.19.9.254/24"]
