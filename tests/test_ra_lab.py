"""The `ra` service against real clients: rdisc6 (ndisc6) solicits and reads the router
advertisement; a Linux client accepting RAs gets no default route and no address from it; a
QEMU node's iPXE (the lab, whose replicas run `ra`) goes from DHCP to its first file without
the IPv6 wait. Solicitations that break RFC 4861's checks are refused. Each replica is a real
`vlx bootsvc run`."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from virtualinux.bootsvc.ra import (
    RaService,
    RsError,
    advertisement,
    eui64_link_local,
    parse_solicitation,
)
from virtualinux.bootsvc.status import read_status
from virtualinux.vvcm import VlxError

from .conftest import EXAMPLE, require, vlx
from .test_lab_scenarios import BOOT_TIMEOUT, lab_dir  # noqa: F401 (a fixture)
from .test_lab_scenarios import status as lab_status
from .test_lab_scenarios import vlx as lab_vlx

VLX = [sys.executable, "-c", "import sys; from virtualinux.vvcm.cli import main; sys.exit(main())"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_solicitation_checks():
    parse_solicitation(bytes([133, 0, 0, 0, 0, 0, 0, 0]), 255)
    parse_solicitation(bytes([133, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7]), 255)
    for data, hops, reason in ((bytes(8), 64, "hop_limit"), (bytes([133, 0]), 255, "short"),
                               (bytes([133, 1, 0, 0, 0, 0, 0, 0]), 255, "type_code"),
                               (bytes([133, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 255, "bad_option"),
                               (bytes([133, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0]), 255, "bad_option")):
        with pytest.raises(RsError) as caught:
            parse_solicitation(data, hops)
        assert caught.value.reason == reason


def test_advertisement_says_no_default_router_and_nothing_else():
    data = advertisement("52:54:00:ab:cd:ef")
    assert data[0] == 134 and data[1] == 0                    # router advertisement, code 0
    assert data[5] == 0                                       # M = O = 0: no DHCPv6
    assert data[6:8] == b"\0\0"                               # router lifetime 0
    assert data[8:16] == bytes(8)                             # reachable, retrans: unspecified
    # One option only: the source link-layer address (type 1, 8 bytes); no prefix.
    assert data[16:] == bytes([1, 1, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef])


def test_advertisement_is_the_bytes_scapy_builds_for_it():
    from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6NDOptSrcLLAddr
    for mac, hop_limit in (("52:54:00:ab:cd:ef", 0), ("02:00:00:00:00:01", 64)):
        expected = ICMPv6ND_RA(chlim=hop_limit, M=0, O=0, H=0, prf=0, P=0, routerlifetime=0,
                               reachabletime=0, retranstimer=0, cksum=0) / \
            ICMPv6NDOptSrcLLAddr(lladdr=mac)
        assert advertisement(mac, hop_limit) == bytes(expected)
    with pytest.raises(ValueError):
        advertisement("52:54:00:ab:cd")


def test_link_local_from_mac_is_modified_eui64():
    assert str(eui64_link_local("52:54:00:ab:cd:ef")) == "fe80::5054:ff:feab:cdef"


def test_intervals_below_rfc_4861s_minimum_are_refused():
    with pytest.raises(VlxError, match="min_interval"):
        RaService(None, None, RaService.Options(min_interval=1.0))


@pytest.mark.lab
def test_client_sees_no_default_router_and_gets_no_route(netns, tmp_path, db_path, capsys):
    require("rdisc6")
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    hub = netns.namespace("hub")
    bridge = netns.bridge(hub)
    replica_ns = netns.namespace("r1")
    netns.plug(hub, bridge, replica_ns, address="198.18.0.201/24", mac="52:54:00:00:02:01")
    # No link-local address on the replica's side: the service must make one (EUI-64).
    with replica_ns.netlink() as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        for address in ipr.get_addr(family=socket.AF_INET6, index=index):
            if address["scope"] == 253:     # RT_SCOPE_LINK
                ipr.addr("del", index=index, address=address.get("IFA_ADDRESS"),
                         prefixlen=address["prefixlen"])
    client = netns.namespace("cli")
    netns.plug(hub, bridge, client)
    # A client that takes default routes and addresses from RAs, as a host would.
    for key in ("forwarding=0", "accept_ra=2", "autoconf=1"):
        client.run(["sysctl", "-qw", f"net.ipv6.conf.eth0.{key}"])
    state = tmp_path / "state"
    log = tmp_path / "replica.log"
    process = replica_ns.popen([*VLX, "--db", str(db_path), "bootsvc", "run", "--interface",
                                "eth0", "--address", "198.18.0.201", "--services", "ra",
                                "--state-dir", str(state)],
                               stdout=log.open("w"), stderr=subprocess.STDOUT)

    def counters() -> dict:
        try:
            return read_status(state).counters("ra")
        except VlxError:
            return {}

    try:
        wait_for(lambda: counters().get("ra_sent", 0) >= 1 or process.poll() is not None,
                 30, "the first RA")
        assert process.poll() is None, log.read_text()
        # rdisc6 solicits (from the client's link-local) and prints the first RA it gets.
        out = client.run(["rdisc6", "-1", "-w", "3000", "-r", "3", "eth0"], check=False,
                         timeout=30).stdout
        assert re.search(r"Router lifetime\s*:\s*0 \(", out), out
        assert re.search(r"Stateful address conf\.\s*:\s*No", out), out
        assert re.search(r"Stateful other conf\.\s*:\s*No", out), out
        assert "Prefix" not in out, out
        assert "from fe80::5054:ff:fe00:201" in out, out     # the address it made
        wait_for(lambda: counters().get("rs_received", 0) >= 1, 10, "rs_received to count")
        sent = counters()["ra_sent"]
        wait_for(lambda: counters()["ra_sent"] > sent, 15, "a periodic RA")
        routes = client.run(["ip", "-6", "route", "show", "default"]).stdout
        assert routes.strip() == "", routes
        addresses = client.run(["ip", "-6", "addr", "show", "dev", "eth0",
                                "scope", "global"]).stdout
        assert addresses.strip() == "", addresses
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(10)


# iPXE's IPv6 configuration timeout with no RA on the segment (shared/LAB.md: the first file
# came about 13 s after DHCP). With the RA, iPXE asks (rs_received) and goes on at once.
IPXE_IPV6_WAIT = 13.0


@pytest.mark.lab
def test_ipxe_node_boots_without_waiting_on_ipv6(lab_dir):  # noqa: F811 (the fixture)
    done = lab_vlx("lab", "up", "--image", "tiny",
                   "--inventory", str(EXAMPLE), "--state-dir", str(lab_dir),
                   "--nodes", "1", "--timeout", str(BOOT_TIMEOUT))
    assert done.returncode == 0, done.stdout + done.stderr
    report = lab_status(lab_dir)
    [node] = report["nodes"]
    assert node["phase"] == "ready"
    seen = node["seen"]
    # Phase times from the lab's own record: the gap between the node's DHCPACK and its
    # first file request is where iPXE would wait on IPv6.
    assert seen["files"] - seen["dhcp"] < IPXE_IPV6_WAIT / 2, seen
    ra = [replica["counters"].get("ra", {}) for replica in report["replicas"]]
    assert sum(c.get("rs_received", 0) for c in ra) >= 1, ra   # iPXE solicited, we heard it
    assert all(c.get("ra_sent", 0) >= 1 for c in ra), ra
