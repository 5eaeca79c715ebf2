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
from virtualinux.vvcm.command import vlx_command

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


@pytest.mark.lab
def test_a_node_resolves_and_gets_time_from_the_world_through_the_vip(netns, tmp_path):
    """The world's DNS and NTP at upstream_dns / ntp_servers, reached from the cluster network
    only through the gateway VIP: our DNS replica forwards a world name there, and chrony
    (the client a node runs) gets an NTP answer."""
    require("nft", "dnsmasq", "chronyd", "dig")
    database = pair_database(tmp_path / "cluster.db", 0.5)
    cluster = uplink.use_uplink(database)
    settings = cluster.settings
    hub = netns.namespace("hub")
    netns.bridge(hub)
    client = netns.namespace("client")
    netns.plug(hub, "br0", client, address=f"{CLIENT}/24")
    gateway = netns.namespace("g201")
    netns.plug(hub, "br0", gateway, address=f"{GATEWAYS[0]}/24")
    up = uplink.plan(settings, 1)
    world = uplink.make_world(netns, up, [gateway])
    processes = []
    try:
        for name, cmd in uplink.world_servers(up, settings, tmp_path / "world").items():
            processes.append(world.popen(cmd, stdout=subprocess.DEVNULL,
                                         stderr=(tmp_path / f"{name}.log").open("w")))
        processes.append(gateway.popen(uplink.heartbeat_command(
            database.path, tmp_path / "state-gw", ipaddress.IPv4Address(GATEWAYS[0]),
            "primary"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        assert processes[-1].stdout.readline().startswith("ready heartbeat")
        client.default_route(VIP)
        # The client is a node: its own DNS replica, which forwards what is not the cluster's.
        replica = client.popen(vlx_command(
            "--db", str(database.path), "bootsvc", "run", "--address", CLIENT,
            "--interface", "eth0", "--services", "dns", "--state-dir", str(tmp_path / "dns")),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        processes.append(replica)
        assert replica.stdout.readline().startswith("ready dns")

        def resolve(name: str) -> str:
            return client.run(["dig", "+short", "+time=2", "+tries=1", f"@{CLIENT}", name],
                              check=False).stdout.strip()

        ping_name = f"ping.{uplink.WORLD_ZONE}"
        wait_for(lambda: resolve(ping_name) == str(up.outside[0]), 30,
                 f"{ping_name} through our DNS, the VIP and the world's DNS")
        assert resolve(f"ntp1.{uplink.WORLD_ZONE}") == str(settings.ntp_servers[0])
        # The world's answer came over the NAT: the world saw the gateway's uplink address.
        assert world.run(["ip", "route", "get", CLIENT], check=False).returncode != 0

        ntp = str(settings.ntp_servers[0])
        # chronyd -Q: one measurement against the server, printed, the clock left alone.
        result = client.run(["chronyd", "-Q", "-t", "20", "-f", "/dev/null",
                             f"server {ntp} iburst maxsamples 1"], check=False, timeout=40)
        assert result.returncode == 0, result.stderr
        assert "System clock wrong by" in result.stdout + result.stderr
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
