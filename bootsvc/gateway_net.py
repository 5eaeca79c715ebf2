"""What holding the gateway does to this host's network, and undoing it exactly.

`Gateway.take()`: the VIP goes on the cluster interface (pyroute2), or with `vmac` on a
macvlan `vrrp.VRID` with the virtual MAC 00:00:5e:00:01:VRID of RFC 5798 7.3, gratuitous ARPs
tell the segment where it went (`vrrp_wire.gratuitous_arp`), and, when the cluster names an
uplink, forwarding is switched on and the cluster network is masqueraded out of the uplink by
an nftables table of its own, `vlx_vrrp_VRID`, so `release()` removes exactly what `take()`
added (the `nft` command: the one tool that speaks nftables' transactions; pyroute2's
nftables support is experimental). `release()` also cleans up after a predecessor killed with
SIGKILL, so the service calls it on start. `run_hook` runs the operator's notify script, never
through a shell.
Imports `vrrp_wire` only.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import subprocess
from pathlib import Path

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import vrrp_wire

log = logging.getLogger(__name__)

GARP_COUNT = 3            # a lost frame must not leave hosts pointing at the old master
HOOK_TIMEOUT = 30.0
ARP_SYSCTLS = {"arp_ignore": "1", "arp_announce": "2"}    # on the base interface, with vmac


class Gateway:
    def __init__(self, interface: str, vip: ipaddress.IPv4Address, vrid: int,
                 network: ipaddress.IPv4Network, uplink: str | None = None,
                 vmac: bool = False):
        self.interface = interface
        self.vip = vip
        self.vrid = vrid
        self.network = network
        self.uplink = uplink
        # RFC 5798 7.3: the virtual router's MAC, on a macvlan that exists only while we
        # are master, so switches and hosts never see it from two ports.
        self.vmac = f"00:00:5e:00:01:{vrid:02x}" if vmac else None
        self.vmac_name = f"vrrp.{vrid}"
        self.table = f"vlx_vrrp_{vrid}"
        self.held = False
        self.sending_index: int | None = None     # the macvlan's, while it exists
        self._forwarding_before: str | None = None
        self._arp_before: dict[str, str] | None = None

    async def take(self) -> int:
        """Hold the VIP; returns how many gratuitous ARPs went out."""
        async with AsyncIPRoute() as ipr:
            index = await self._index(ipr, self.interface)
            if self.vmac:
                index = await self._add_vmac(ipr, index)
                self.sending_index = index
            try:
                await ipr.addr("add", index=index, address=str(self.vip), prefixlen=32)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise OSError(err.code, f"adding {self.vip}: {err}") from None
            mac = (await ipr.link("get", index=index))[0].get("IFLA_ADDRESS")
        self.held = True
        sent = self._gratuitous_arp(self.vmac_name if self.vmac else self.interface, mac)
        if self.uplink:
            await self._nat_on()
        return sent

    async def release(self) -> None:
        """Give the VIP and the NAT back; quiet when there is nothing to give back."""
        async with AsyncIPRoute() as ipr:
            try:
                await ipr.addr("del", index=await self._index(ipr, self.interface),
                               address=str(self.vip), prefixlen=32)
            except NetlinkError as err:
                if err.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                    raise OSError(err.code, f"removing {self.vip}: {err}") from None
            if self.vmac:
                # Also a macvlan left by a predecessor killed with SIGKILL.
                found = await ipr.link_lookup(ifname=self.vmac_name)
                if found:
                    await ipr.link("del", index=found[0])
                self.sending_index = None
                for name, value in (self._arp_before or {}).items():
                    _sysctl(f"ipv4/conf/{self.interface}/{name}", value)
                self._arp_before = None
        self.held = False
        await self._nat_off()

    async def _add_vmac(self, ipr: AsyncIPRoute, base: int) -> int:
        if not await ipr.link_lookup(ifname=self.vmac_name):
            await ipr.link("add", ifname=self.vmac_name, kind="macvlan", link=base,
                           macvlan_mode="private", address=self.vmac)
        # The base interface must not tie the VIP to its own MAC: not in answers (Linux answers
        # for any local address on any interface unless arp_ignore=1), not in its own requests
        # (sent from the VIP when it answers from the VIP unless arp_announce=2). No IPv6 on
        # the macvlan, whose link-local traffic would come from the virtual MAC too.
        if self._arp_before is None:
            self._arp_before = {name: _sysctl(f"ipv4/conf/{self.interface}/{name}", value)
                                for name, value in ARP_SYSCTLS.items()}
        _sysctl(f"ipv6/conf/{self.vmac_name}/disable_ipv6", "1")
        index = await self._index(ipr, self.vmac_name)
        await ipr.link("set", index=index, state="up")
        return index

    @staticmethod
    async def _index(ipr: AsyncIPRoute, name: str) -> int:
        found = await ipr.link_lookup(ifname=name)
        if not found:
            raise OSError(errno.ENODEV, f"no interface {name}")
        return found[0]

    def _gratuitous_arp(self, interface: str, mac: str) -> int:
        # An ARP request for the VIP from the VIP with our MAC as sender and target (RFC 5798
        # 6.4.1): every host that has the VIP cached replaces the old master's MAC with ours.
        # A plain packet socket sends it: opening scapy's L2Socket took 12-15 ms here, on the
        # takeover's critical path (bench/failover.py).
        frame = vrrp_wire.gratuitous_arp(mac, self.vip)
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind((interface, 0))
                for _ in range(GARP_COUNT):
                    sock.send(frame)
        except OSError as err:
            log.warning("gratuitous ARP for %s on %s failed: %s", self.vip, interface, err)
            return 0
        return GARP_COUNT

    async def _nat_on(self) -> None:
        forwarding = _sysctl("ipv4/ip_forward", "1")
        if self._forwarding_before is None:
            self._forwarding_before = forwarding
        # One transaction: create (so the delete cannot fail), delete, define afresh.
        ruleset = (f"add table ip {self.table}\n"
                   f"delete table ip {self.table}\n"
                   f"table ip {self.table} {{\n"
                   f"  chain postrouting {{\n"
                   f"    type nat hook postrouting priority srcnat; policy accept;\n"
                   f"    ip saddr {self.network} oifname \"{self.uplink}\" masquerade\n"
                   f"  }}\n"
                   f"}}\n")
        await _nft(ruleset)
        log.info("NAT %s -> %s on (nftables table %s)", self.network, self.uplink, self.table)

    async def _nat_off(self) -> None:
        if not self.uplink:
            return
        await _nft(f"add table ip {self.table}\ndelete table ip {self.table}\n")
        if self._forwarding_before is not None:
            _sysctl("ipv4/ip_forward", self._forwarding_before)
            self._forwarding_before = None


def _sysctl(name: str, value: str) -> str:
    """Set /proc/sys/net/NAME (this network namespace's) to `value`; returns the old value."""
    path = Path("/proc/sys/net") / name
    before = path.read_text().strip()
    path.write_text(value + "\n")
    return before


async def _nft(ruleset: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "nft", "-f", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    _, err = await process.communicate(ruleset.encode())
    if process.returncode != 0:
        raise OSError(f"nft failed: {err.decode(errors='replace').strip()}")


async def run_hook(path: str, state: str) -> int | None:
    """Run `path STATE` (no shell, so nothing in it is interpreted); its exit code, None if
    it could not run or outlived HOOK_TIMEOUT."""
    try:
        process = await asyncio.create_subprocess_exec(
            path, state, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    except OSError as err:
        log.warning("notify hook %s %s: %s", path, state, err)
        return None
    try:
        return await asyncio.wait_for(process.wait(), HOOK_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        log.warning("notify hook %s %s: still running after %.0f s, killed", path, state,
                    HOOK_TIMEOUT)
        return None
