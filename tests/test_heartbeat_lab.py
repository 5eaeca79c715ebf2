"""The gateway heartbeat in network namespaces: two of ours, ours with keepalived (both ways),
a partition that heals, malformed advertisements on the wire, and NAT out of the uplink.
Each of ours is a real `vlx bootsvc run --services heartbeat` process (vm_test.vrrp_pair)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, in4_chksum
from virtualinux.bootsvc import vrrp_wire as wire
from virtualinux.bootsvc.status import read_status
from virtualinux.vm_test.vrrp_pair import (
    BACKUP,
    MACS,
    PRIMARY,
    VIP,
    VLX,
    PairLab,
    Speaker,
    probe_result,
    start_probe,
)
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import Database, changes

from .conftest import require

pytestmark = pytest.mark.lab

# Half a second: master-down about 1.7 s, quick tests that a loaded machine does not make flap.
INTERVAL = 0.5
SETTLE = 30.0     # a safety net only: every wait ends on the state it waits for


@pytest.fixture
def pair(netns, tmp_path):
    require("keepalived", "nft", "ping")
    lab = PairLab(netns, tmp_path, INTERVAL)
    try:
        yield lab
    finally:
        lab.close()


def wait_state(speaker: Speaker, state: str, timeout: float = SETTLE) -> None:
    wait_for(lambda: speaker.state() == state, timeout,
             f"{speaker.kind} {speaker.address} to be {state} (is {speaker.state()}):\n"
             + (speaker.log.read_text()[-1500:] if speaker.log.exists() else ""))


def wait_settled(master: Speaker, backup: Speaker) -> None:
    """The master holds the VIP and the backup has heard it (ours say whom they follow)."""
    wait_state(master, "master")
    wait_for(master.holds_vip, SETTLE, f"{master.address} to hold the VIP")
    wait_state(backup, "backup")
    if backup.kind == "ours":
        wait_for(lambda: backup.status().get("master") == master.address, SETTLE,
                 f"{backup.address} to follow {master.address}")
    else:
        time.sleep(3 * INTERVAL)    # keepalived says nothing: give it three adverts to hear
    assert not backup.holds_vip()


def two_of_ours(lab: PairLab) -> tuple[Speaker, Speaker]:
    """Our primary and backup, started and settled."""
    primary, backup = lab.speaker(PRIMARY, "ours"), lab.speaker(BACKUP, "ours")
    primary.start()
    backup.start()
    wait_settled(primary, backup)
    return primary, backup


def assert_vip_answers_from(lab: PairLab, speaker: Speaker) -> None:
    """An echo reply for the VIP comes from `speaker`'s MAC (the client was told by ARP)."""
    probe = start_probe(lab.client, speaker.mac, SETTLE)
    assert probe_result(probe) is not None, f"no reply for {VIP} from {speaker.mac}"
    neighbour = lab.client.run(["ip", "neigh", "show", VIP, "dev", "eth0"]).stdout
    assert speaker.mac in neighbour


def kill_and_take_over(lab: PairLab, master: Speaker, backup: Speaker) -> None:
    probe = start_probe(lab.client, backup.mac, SETTLE)
    master.kill()
    killed = time.monotonic()
    replied = probe_result(probe)
    assert replied is not None, f"the VIP never answered from {backup.address}"
    assert replied > killed
    wait_state(backup, "master")
    assert backup.holds_vip()
    assert_vip_answers_from(lab, backup)


def restart_and_preempt(lab: PairLab, primary: Speaker, backup: Speaker) -> None:
    primary.start()
    wait_settled(primary, backup)
    assert_vip_answers_from(lab, primary)


def test_backup_takes_over_when_the_primary_is_killed_and_the_primary_preempts(pair):
    primary, backup = two_of_ours(pair)
    assert primary.status()["vip_held"] and primary.status()["priority"] == 200
    assert_vip_answers_from(pair, primary)
    shown = subprocess.run([*VLX, "bootsvc", "status", "--state-dir", str(backup.state_dir)],
                           capture_output=True, text=True, check=True).stdout
    detail = {(row[0], row[1]): row[2] for row in
              (re.split(r"\s{2,}", line.strip()) for line in shown.splitlines())
              if len(row) == 3 and row[0] == "heartbeat"}
    assert (detail[("heartbeat", "state")], detail[("heartbeat", "priority")],
            detail[("heartbeat", "vrid")]) == ("backup", "100", "51")
    assert (detail[("heartbeat", "master")], detail[("heartbeat", "vip")],
            detail[("heartbeat", "vip held")]) == (PRIMARY, VIP, "False")

    kill_and_take_over(pair, primary, backup)
    assert "no advertisement for" in backup.status()["last_change"]

    restart_and_preempt(pair, primary, backup)
    assert backup.status()["last_change"] == (
        f"master -> backup (higher priority 200 from {PRIMARY})")
    # The restarted primary started as backup and took the VIP back once.
    assert primary.status()["counters"]["became_master"] == 1


def test_sigterm_hands_over_at_once_with_priority_zero(pair):
    primary, backup = two_of_ours(pair)
    primary.stop()
    assert not primary.holds_vip()             # released on the way out
    wait_state(backup, "master")
    # Priority 0 cut the wait to the backup's skew time, no master-down interval.
    assert backup.status()["last_change"] == (
        f"backup -> master (master {PRIMARY} stepped down (priority 0))")


def test_a_healed_partition_leaves_one_master(pair):
    primary, backup = two_of_ours(pair)
    pair.cut(PRIMARY, up=False)
    wait_state(backup, "master")
    assert primary.state() == "master"          # split brain while the link is cut
    pair.cut(PRIMARY, up=True)
    wait_state(backup, "backup")
    assert primary.state() == "master" and not backup.holds_vip()
    assert backup.status()["last_change"].startswith("master -> backup (higher priority 200")
    assert_vip_answers_from(pair, primary)


@pytest.mark.parametrize("ours_is", ["primary", "backup"])
def test_keepalived_as_the_peer(pair, ours_is):
    if ours_is == "primary":
        primary, backup = pair.speaker(PRIMARY, "ours"), pair.speaker(BACKUP, "keepalived")
    else:
        primary, backup = pair.speaker(PRIMARY, "keepalived"), pair.speaker(BACKUP, "ours")
    primary.start()
    backup.start()
    wait_settled(primary, backup)
    assert_vip_answers_from(pair, primary)
    ours = primary if ours_is == "primary" else backup
    assert ours.status()["counters"].get("adverts_received" if ours is backup
                                         else "adverts_sent", 0) > 0
    assert not any(k.startswith("dropped_") for k in ours.status()["counters"])

    kill_and_take_over(pair, primary, backup)
    restart_and_preempt(pair, primary, backup)
    if ours is backup:
        assert backup.status()["last_change"] == (
            f"master -> backup (higher priority 200 from {PRIMARY})")
    # keepalived logs what it made of our advertisements: never a complaint.
    assert "invalid" not in next(s for s in pair.speakers if s.kind == "keepalived"
                                 ).log.read_text().lower()


def malformed_frames() -> dict[str, list[bytes]]:
    """IP packets that would take the master's place if they were accepted (priority 254 from
    an address above both), each broken in one way, by the counter it must land in."""
    source = "198.18.0.250"
    advert = wire.Advertisement(vrid=51, priority=254, interval=50,
                                addresses=(ipaddress.IPv4Address(VIP),))
    good = bytearray(wire.encode_ip(advert, ipaddress.IPv4Address(source)))

    def rebuilt(message: bytes, ttl: int = 255) -> bytes:
        # A valid IP header (scapy recomputes length and checksum) around a broken message.
        return bytes(IP(src=source, dst=str(wire.GROUP), ttl=ttl, proto=112) / message)

    def with_checksum(message: bytearray) -> bytes:
        message[6:8] = b"\0\0"
        message[6:8] = in4_chksum(112, IP(src=source, dst=str(wire.GROUP)),
                                  bytes(message)).to_bytes(2, "big")
        return bytes(message)

    message = bytearray(good[20:])
    bad_sum = bytearray(message)
    bad_sum[7] ^= 0x55
    v2 = bytearray(message)
    v2[0] = 0x21
    type2 = bytearray(message)
    type2[0] = 0x32
    count = bytearray(message)
    count[3] = 3
    vrid = bytearray(message)
    vrid[1] = 52
    return {
        "bad_checksum": [rebuilt(bytes(bad_sum))],
        "bad_ttl": [rebuilt(bytes(message), ttl=64)],
        "bad_version": [rebuilt(with_checksum(v2))],
        "bad_type": [rebuilt(with_checksum(type2))],
        "address_count": [rebuilt(with_checksum(count))],
        "wrong_vrid": [rebuilt(with_checksum(vrid))],
        "truncated": [rebuilt(bytes(message[:6]))],
    }


def send_frames(lab: PairLab, packets: list[bytes]) -> None:
    """Send whole IP packets as Ethernet multicast frames from the client's namespace."""
    code = ("import sys, socket\n"
            "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
            "s.bind(('eth0', 0))\n"
            "mac = open('/sys/class/net/eth0/address').read().strip().replace(':', '')\n"
            "head = bytes.fromhex('01005e000012' + mac + '0800')\n"
            "for line in sys.stdin:\n"
            "    s.send(head + bytes.fromhex(line.strip()))\n")
    lab.client.run([sys.executable, "-c", code],
                   input="".join(p.hex() + "\n" for p in packets))


def test_malformed_advertisements_are_dropped_counted_and_change_nothing(pair):
    primary, backup = two_of_ours(pair)
    frames = malformed_frames()
    repeat = 5
    send_frames(pair, [p for packets in frames.values() for p in packets] * repeat)
    expected = {f"dropped_{reason}": len(packets) * repeat for reason, packets in frames.items()}
    for speaker in (primary, backup):
        wait_for(lambda s=speaker: all(s.status()["counters"].get(k) == v
                                       for k, v in expected.items()), SETTLE,
                 f"{speaker.address} to count the drops (has {speaker.status()['counters']})")
    assert primary.state() == "master" and backup.state() == "backup"
    assert primary.status()["counters"]["became_master"] == 1
    assert "became_master" not in backup.status()["counters"]
    assert backup.status()["master"] == PRIMARY
    # Logged once per source and reason, not once per packet.
    log = primary.log.read_text()
    assert log.count("VRRP packet from 198.18.0.250 dropped: checksum") == 1


@pytest.fixture
def uplinked(netns, tmp_path):
    """The pair with an uplink each (up0) into a world namespace at 198.19.0.1 that knows no
    route back to the cluster network: a client reaches it only through the master's NAT."""
    yield from uplinked_pair(netns, tmp_path, track=True)


@pytest.fixture
def uplinked_untracked(netns, tmp_path):
    """As `uplinked`, with vrrp_track_uplink off in the database."""
    yield from uplinked_pair(netns, tmp_path, track=False)


def uplinked_pair(netns, tmp_path, track: bool):
    require("nft", "ping")
    lab = PairLab(netns, tmp_path, INTERVAL, gateway_uplink="up0", vrrp_track_uplink=track)
    try:
        world = netns.namespace("world")
        outside = netns.bridge(world, "br1")
        world.add_address(outside, "198.19.0.1/24")
        lab.uplinks = {}
        for address in (PRIMARY, BACKUP):
            lab.uplinks[address] = (world, netns.plug(
                world, outside, lab.namespaces[address], ifname="up0",
                address=f"198.19.0.{address.rsplit('.', 1)[1]}/24"))
        yield lab
    finally:
        lab.close()


def world_answers(lab: PairLab) -> bool:
    return lab.client.run(["ping", "-c", "1", "-W", "2", "198.19.0.1"],
                          check=False).returncode == 0


def nat_tables(speaker: Speaker) -> str:
    return speaker.ns.run(["nft", "list", "tables"]).stdout


def test_master_masquerades_the_cluster_out_of_the_uplink(uplinked):
    lab = uplinked
    primary, backup = two_of_ours(lab)
    assert "vlx_vrrp_51" in nat_tables(primary) and "vlx_vrrp_51" not in nat_tables(backup)
    wait_for(lambda: world_answers(lab), SETTLE, "the world to answer through the NAT")

    primary.stop()          # gives the address and the NAT back
    assert "vlx_vrrp_51" not in nat_tables(primary)
    assert primary.ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
    wait_state(backup, "master")
    assert "vlx_vrrp_51" in nat_tables(backup)
    wait_for(lambda: world_answers(lab), SETTLE, "the world to answer through the backup")
    assert MACS[BACKUP] in lab.client.run(["ip", "neigh", "show", VIP]).stdout


def test_a_master_whose_uplink_goes_down_hands_over_and_takes_back(uplinked):
    lab = uplinked
    primary, backup = two_of_ours(lab)
    world, link = lab.uplinks[PRIMARY]
    world.set_link(link, False)        # the primary's up0 loses its carrier
    wait_settled(backup, primary)
    assert primary.status()["priority"] == 50 and primary.status()["track_down"]
    assert primary.status()["last_change"] == (
        f"master -> backup (higher priority 100 from {BACKUP})")
    wait_for(lambda: world_answers(lab), SETTLE, "the world to answer through the backup")

    world.set_link(link, True)
    wait_settled(primary, backup)
    assert primary.status()["priority"] == 200
    assert primary.status()["counters"]["track_down"] == 1
    assert primary.status()["counters"]["track_up"] == 1


def set_tracking(lab: PairLab, track: bool) -> None:
    Database(lab.db_path).update("settings", "track the uplink", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, vrrp_track_uplink=track)))


def test_turning_uplink_tracking_on_and_off_takes_effect_without_a_restart(uplinked_untracked):
    lab = uplinked_untracked
    primary, backup = two_of_ours(lab)
    world, link = lab.uplinks[PRIMARY]
    world.set_link(link, False)        # not tracked yet: the primary stays master
    assert "tracked" not in primary.status() and primary.status()["priority"] == 200

    set_tracking(lab, True)            # the running pair reloads: the down uplink now counts
    wait_settled(backup, primary)
    status = primary.status()
    assert (status["tracked"], status["track_down"], status["priority"]) == ("up0", True, 50)
    assert primary.running() and backup.running()   # nobody was restarted

    set_tracking(lab, False)           # and no longer: the penalty goes, the primary preempts
    wait_settled(primary, backup)
    assert "tracked" not in primary.status() and primary.status()["priority"] == 200
    assert primary.status()["counters"]["track_down"] == 1

    world.set_link(link, True)
    set_tracking(lab, True)            # tracked again, uplink up: nothing changes hands
    wait_for(lambda: primary.status().get("tracked") == "up0", SETTLE, "tracking up0 again")
    assert primary.status()["priority"] == 200 and primary.state() == "master"


def test_a_node_outside_the_pair_refuses_to_start(pair):
    ns = pair.netns.namespace("n3")
    pair.netns.plug(pair.hub, pair.bridge, ns, address="198.18.0.13/24")
    result = ns.run([*VLX, "--db", str(pair.db_path), "bootsvc", "run", "--interface", "eth0",
                     "--address", "198.18.0.13", "--services", "heartbeat",
                     "--state-dir", str(pair.work / "n3")], check=False)
    assert result.returncode == 2, result.stderr
    assert ("node3 is not a node of the gateway pair (gateway-primary node1, "
            "gateway-backup node2)") in result.stderr


def test_a_replica_beside_the_nodes_takes_a_role_and_runs_the_notify_hook(pair, tmp_path):
    """The lab's case: the replica is not a node, its options make it the primary."""
    out = tmp_path / "hook.out"
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho \"$1\" >> {out}\n")
    hook.chmod(0o755)
    backup = pair.speaker(BACKUP, "ours")
    backup.start()
    state = tmp_path / "primary-state"
    primary = pair.namespaces[PRIMARY].popen(
        [*VLX, "--db", str(pair.db_path), "bootsvc", "run", "--interface", "eth0",
         "--address", PRIMARY, "--services", "heartbeat", "--state-dir", str(state),
         "--set", "heartbeat.role=primary", "--set", f"heartbeat.notify={hook}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert primary.stdout.readline().startswith("ready heartbeat")
        wait_for(lambda: backup.status().get("master") == PRIMARY, SETTLE,
                 "the backup to follow the primary")
        wait_for(lambda: out.exists() and out.read_text() == "backup\nmaster\n", SETTLE,
                 "the hook to be told backup, then master")
        held = pair.namespaces[PRIMARY].ipv4_addresses()
        assert [a for a in held if a.startswith(f"{VIP}/")] == [f"{VIP}/32"]
        primary.terminate()
        primary.communicate(timeout=30)
        assert primary.returncode == 0        # a clean stop: systemd would not call it failed
        assert read_status(state).counters("heartbeat")["became_master"] == 1
        assert out.read_text() == "backup\nmaster\ninitialize\n"
        wait_state(backup, "master")
    finally:
        if primary.poll() is None:
            primary.kill()
            primary.wait(10)


def test_the_virtual_mac_moves_with_the_gateway(netns, tmp_path):
    """vrrp_vmac: the VIP answers from 00:00:5e:00:01:33 (VRID 51) on whichever node is
    master, so the client's ARP entry never changes."""
    vmac = "00:00:5e:00:01:33"
    lab = PairLab(netns, tmp_path, INTERVAL, vrrp_vmac=True)
    try:
        primary, backup = two_of_ours(lab)

        def vmac_on(speaker: Speaker) -> bool:
            out = speaker.ns.run(["ip", "-o", "link", "show", "vrrp.51"], check=False).stdout
            return vmac in out

        assert vmac_on(primary) and not vmac_on(backup)
        # The master's advertisements come from the virtual MAC (RFC 5798 7.3).
        seen = lab.client.run(["tcpdump", "-c", "1", "-e", "-n", "-i", "eth0", "ip proto 112"],
                              timeout=SETTLE).stdout
        assert seen.startswith(tuple("0123456789")) and f"{vmac} > 01:00:5e:00:00:12" in seen
        # Requests go to the virtual MAC; the node routes its replies out of eth0.
        assert probe_result(start_probe(lab.client, primary.mac, SETTLE)) is not None
        assert vmac in lab.client.run(["ip", "neigh", "show", VIP]).stdout
        # The base interface leaves ARP for the VIP to the macvlan.
        arping = lab.client.run(["arping", "-c", "2", "-w", "5", "-I", "eth0", VIP],
                                check=False).stdout
        assert vmac.upper() in arping.upper() and MACS[PRIMARY].upper() not in arping.upper()

        primary.stop()
        assert not vmac_on(primary)
        wait_state(backup, "master")
        wait_for(lambda: vmac_on(backup), SETTLE, "the backup's virtual MAC")
        assert probe_result(start_probe(lab.client, backup.mac, SETTLE)) is not None
        assert vmac in lab.client.run(["ip", "neigh", "show", VIP]).stdout
    finally:
        lab.close()


def test_a_new_generation_moves_the_vip_and_changes_the_interval(pair):
    primary, backup = two_of_ours(pair)
    new_vip = "198.18.0.250"
    Database(pair.db_path).update("settings", "new gateway", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, gateway_vip=ipaddress.IPv4Address(new_vip),
                               vrrp_interval=0.3)))

    def addresses(speaker: Speaker) -> str:
        return speaker.ns.run(["ip", "-4", "-o", "addr", "show"]).stdout

    wait_for(lambda: f" {new_vip}/32" in addresses(primary), SETTLE, "the new VIP")
    assert f" {VIP}/" not in addresses(primary) and new_vip not in addresses(backup)
    wait_for(lambda: backup.status().get("interval") == 0.3, SETTLE, "the new interval")
    assert primary.state() == "master" and backup.status()["master"] == PRIMARY
    # The two reload at their own poll: an advert or two may carry the other VIP meanwhile.
    assert "became_master" not in backup.status()["counters"]
