"""The lab's uplink (vm_test.uplink): the world answers a cluster client only through the
gateway VIP, with the heartbeat on two replicas that are not nodes, as `vlx lab up` runs it."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess

import pytest
from virtualinux.vm_test import uplink
from virtualinux.vm_test.vrrp_pair import VIP, pair_database
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import VlxError

from .conftest import require

GATEWAYS = ("198.18.0.201", "198.18.0.202")   # lab replicas stand beside the nodes
CLIENT = "198.18.0.200"


def test_the_world_is_the_24_of_the_named_outside_addresses(tmp_path):
    settings = pair_database(tmp_path / "c.db", 1.0).load().settings
    up = uplink.plan(settings)
    assert up.network == ipaddress.IPv4Network("198.18.1.0/24")
    assert up.outside == tuple(map(ipaddress.IPv4Address,
                                   ("198.18.1.1", "198.18.1.53", "198.18.1.123")))
    assert up.gateways == tuple(map(ipaddress.IPv4Address, ("198.18.1.254", "198.18.1.253")))
    bare = dataclasses.replace(settings, upstream_dns=(), ntp_servers=())
    assert uplink.plan(bare).network == uplink.DEFAULT_NETWORK


@pytest.mark.parametrize("outside", ["198.18.0.53", "10.0.0.53", "198.18.1.53,198.18.2.123"])
def test_outside_addresses_the_lab_cannot_hold_are_refused(tmp_path, outside):
    settings = pair_database(tmp_path / "c.db", 1.0).load().settings
    bad = dataclasses.replace(settings, ntp_servers=(), upstream_dns=tuple(
        ipaddress.IPv4Address(a) for a in outside.split(",")))
    with pytest.raises(VlxError, match="give upstream_dns and ntp_servers addresses of one"):
        uplink.plan(bad)


@pytest.mark.lab
def test_a_client_reaches_the_world_only_through_the_gateway_vip(netns, tmp_path):
    require("nft", "ping")
    database = pair_database(tmp_path / "cluster.db", 0.5)
    cluster = uplink.use_uplink(database)
    hub = netns.namespace("hub")
    netns.bridge(hub)
    client = netns.namespace("client")
    netns.plug(hub, "br0", client, address=f"{CLIENT}/24")
    gateways = []
    for address in GATEWAYS:
        ns = netns.namespace(f"g{address.rsplit('.', 1)[1]}")
        netns.plug(hub, "br0", ns, address=f"{address}/24")
        gateways.append(ns)
    up = uplink.plan(cluster.settings)
    world = uplink.make_world(netns, up, gateways)
    processes = []
    try:
        for ns, address, role in zip(gateways, GATEWAYS, uplink.ROLES, strict=True):
            processes.append(ns.popen(uplink.heartbeat_command(
                database.path, tmp_path / f"state-{address}", ipaddress.IPv4Address(address),
                role),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        for process in processes:
            assert process.stdout.readline().startswith("ready heartbeat")

        def answers(target: str) -> bool:
            return client.run(["ping", "-c", "1", "-W", "2", target],
                              check=False).returncode == 0

        # Before the client has a route via the VIP, the world is out of reach.
        assert not answers("198.18.1.53")
        client.default_route(VIP)
        for target in map(str, up.outside):
            wait_for(lambda t=target: answers(t), 30, f"{target} through the gateway")
        # The world knows no way back but the NAT: it has no route to the cluster network.
        assert world.run(["ip", "route", "get", CLIENT], check=False).returncode != 0

        processes[0].kill()        # the primary dies; the backup's NAT takes over
        processes[0].wait(10)
        gateways[0].set_link("up0", False)   # and its node with it
        wait_for(lambda: answers("198.18.1.53"), 30, "the world through the backup")
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
