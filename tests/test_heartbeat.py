"""The heartbeat service without a network: who is in the pair, drops, the notify hook."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from pathlib import Path

import pytest
from virtualinux.bootsvc import options
from virtualinux.bootsvc import vrrp_wire as wire
from virtualinux.bootsvc.gateway_net import run_hook
from virtualinux.bootsvc.heartbeat import HeartbeatService, router_config
from virtualinux.bootsvc.service import Replica
from virtualinux.bootsvc.vrrp_state import State
from virtualinux.vvcm import Cluster, VlxError, inventory

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"


@pytest.fixture
def cluster():
    return inventory.apply(Cluster(generation=1, settings=None), inventory.load(EXAMPLE),
                           str(EXAMPLE))


def replica(cluster, name: str | None, address: str = "198.18.0.11") -> Replica:
    node = cluster.node(name) if name else None
    return Replica(node, "eth0", ipaddress.IPv4Address(address), Path("/nonexistent"),
                   Path("/nonexistent"))


def test_the_pair_gets_its_priorities_from_the_database(cluster):
    primary = router_config(cluster, replica(cluster, "node1"), HeartbeatService.Options())
    backup = router_config(cluster, replica(cluster, "node2", "198.18.0.12"),
                           HeartbeatService.Options())
    assert (primary.priority, backup.priority) == (200, 100)
    assert primary.vrid == 51 and primary.interval == 100
    assert primary.addresses == (ipaddress.IPv4Address("198.18.0.254"),)
    assert primary.address == ipaddress.IPv4Address("198.18.0.11")


def test_settings_change_vrid_interval_and_priorities(cluster):
    settings = dataclasses.replace(cluster.settings, vrrp_id=7, vrrp_interval=0.1,
                                   vrrp_priority_backup=150, vrrp_preempt_delay=2.5)
    changed = dataclasses.replace(cluster, settings=settings)
    config = router_config(changed, replica(changed, "node2"), HeartbeatService.Options())
    assert (config.vrid, config.interval, config.priority, config.preempt_delay) == (
        7, 10, 150, 2.5)


def test_a_node_outside_the_pair_is_refused_naming_the_pair(cluster):
    with pytest.raises(VlxError, match="node3 is not a node of the gateway pair "
                                       r"\(gateway-primary node1, gateway-backup node2\)"):
        router_config(cluster, replica(cluster, "node3"), HeartbeatService.Options())


def test_a_replica_beside_the_nodes_takes_its_role_or_priority_from_options(cluster):
    lab = replica(cluster, None, "198.18.0.2")
    with pytest.raises(VlxError, match="198.18.0.2 \\(not a node\\)"):
        router_config(cluster, lab, HeartbeatService.Options())
    assert router_config(cluster, lab, HeartbeatService.Options(role="backup")).priority == 100
    assert router_config(cluster, lab, HeartbeatService.Options(priority=42)).priority == 42
    with pytest.raises(VlxError, match="role 'boss'"):
        router_config(cluster, lab, HeartbeatService.Options(role="boss"))


def test_malformed_packets_are_counted_by_reason_and_never_change_state(cluster):
    service = HeartbeatService(replica(cluster, "node2", "198.18.0.12"), cluster)
    good = bytearray(wire.encode_ip(
        wire.Advertisement(51, 200, 100, (ipaddress.IPv4Address("198.18.0.254"),)),
        ipaddress.IPv4Address("198.18.0.11")))
    bad_ttl = wire.encode_ip(
        wire.Advertisement(51, 200, 100, (ipaddress.IPv4Address("198.18.0.254"),)),
        ipaddress.IPv4Address("198.18.0.11"), ttl=64)
    bad_sum = bytearray(good)
    bad_sum[-1] ^= 1
    other_vrid = wire.encode_ip(
        wire.Advertisement(52, 200, 100, (ipaddress.IPv4Address("198.18.0.254"),)),
        ipaddress.IPv4Address("198.18.0.11"))
    for data in (bad_ttl, bytes(bad_sum), other_vrid, bytes(good[:25]), b""):
        service.handle(data, "198.18.0.11")
    assert dict(service.counters) == {"dropped_bad_ttl": 1, "dropped_bad_checksum": 1,
                                      "dropped_wrong_vrid": 1, "dropped_truncated": 2}
    assert service.router.state is State.INITIALIZE and service.router.master_address is None


def test_options_from_the_command_line_override_the_database(cluster):
    parsed = options.parse(("heartbeat",), ["heartbeat.priority=77"], [])
    service = HeartbeatService(replica(cluster, None), cluster, parsed["heartbeat"])
    assert service.router.priority == 77
    with pytest.raises(VlxError, match="port"):
        options.parse(("heartbeat",), ["heartbeat.port=112"], [])
    with pytest.raises(VlxError, match="track_weight 300"):
        HeartbeatService(replica(cluster, "node1"), cluster,
                         dataclasses.replace(HeartbeatService.Options(), track_weight=300))


def test_notify_hook_gets_the_state_as_one_argument_without_a_shell(tmp_path):
    out = tmp_path / "out"
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\nprintf '%s|' \"$#\" \"$1\" >> {out}\nexit 3\n")
    hook.chmod(0o755)
    assert asyncio.run(run_hook(str(hook), "master; touch pwned")) == 3
    assert out.read_text() == "1|master; touch pwned|"
    assert not (tmp_path / "pwned").exists()
    assert asyncio.run(run_hook(str(tmp_path / "missing"), "backup")) is None


def example_with(lines: str) -> str:
    """The example inventory with `lines` in [cluster] in place of its heartbeat keys."""
    text = EXAMPLE.read_text().replace("vrrp_id = 51\nvrrp_interval = 1.0\n", "")
    return text.replace("cpu_overcommit = 2.0", f"cpu_overcommit = 2.0\n{lines}")


@pytest.mark.parametrize(("line", "message"), [
    ("vrrp_interval = 0.005", "vrrp_interval = 0.005: must be 0.01 to 40.95 seconds"),
    ("vrrp_interval = 41", "must be 0.01 to 40.95 seconds"),
    ("vrrp_id = 256", "vrrp_id = 256: must be between 1 and 255"),
    ("vrrp_priority_primary = 255", "must be between 1 and 254"),
    ("vrrp_preempt_delay = -1", "must be 0 to 3600 seconds"),
    ('gateway_uplink = "eth0/x"', "expected a network interface name"),
    ('vrrp_track_uplink = "maybe"', "expected true or false"),
])
def test_bad_heartbeat_settings_are_one_clear_error(line, message):
    text = example_with(line)
    with pytest.raises(VlxError, match=message.replace("(", r"\(").replace(".", r"\.")):
        inventory.parse(text, "cluster.toml")


def test_heartbeat_settings_round_trip_through_the_inventory():
    text = example_with('vrrp_interval = 0.1\ngateway_uplink = "up0"\n'
                        'vrrp_track_uplink = true\nvrrp_preempt_delay = 5')
    settings = inventory.parse(text).settings
    assert (settings.vrrp_interval, settings.gateway_uplink, settings.vrrp_track_uplink,
            settings.vrrp_preempt_delay) == (0.1, "up0", True, 5.0)
    cluster = inventory.apply(Cluster(generation=1, settings=None), inventory.parse(text), "x")
    assert inventory.parse(inventory.dump(cluster)).settings == settings
