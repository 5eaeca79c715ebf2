"""DHCP benchmark: perfdhcp against our replica and against dnsmasq, side by side, in one run.

    python -m virtualinux.bench.dhcp [--sizes 1000,10000] [--seconds 4]

For each size N it makes a database of N nodes and a dnsmasq `dhcp-host` map of the same MACs,
then for each server finds the highest perfdhcp rate (DORA exchanges per second) that completes
with no drops, stepping `-r` up, and prints both rates, their ratio and each server's peak RSS.
dnsmasq runs with `--no-ping` and its normal lease file (in a temporary directory): it has to
write leases, we do not, and that difference is part of what is measured. Everything runs in
network namespaces this script makes and removes; every perfdhcp run is bounded in time.
Needs root. `cluster_database` is also used by the tests to make big clusters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtualinux.vm_test.netns import Namespace, Netns
from virtualinux.vvcm import Database, Node, Settings
from virtualinux.vvcm.changes import validated

CIDR = ipaddress.IPv4Network("198.18.0.0/18")      # room for 15,000 nodes
GATEWAY_VIP = ipaddress.IPv4Address("198.18.0.254")
SERVER_ADDRESS = ipaddress.IPv4Address("198.18.0.201")
CLIENT_ADDRESS = ipaddress.IPv4Address("198.18.0.200")
FIRST_NODE = ipaddress.IPv4Address("198.18.1.1")


def node_mac(index: int) -> str:
    return "52:54:" + ":".join(f"{b:02x}" for b in (index + 1).to_bytes(4, "big"))


def node_ip(index: int) -> ipaddress.IPv4Address:
    return FIRST_NODE + index


def cluster_database(path: Path, count: int, lease_time: int = 3600) -> Database:
    """A database of `count` nodes n1, n2, ... with MACs `node_mac(i)` and IPs `node_ip(i)`."""
    db = Database.create(path)
    settings = Settings(name="bench", domain="cluster.lab", cidr=CIDR, gateway_vip=GATEWAY_VIP,
                        upstream_dns=(), ntp_servers=(), lease_time=lease_time)
    nodes = tuple(Node(name=f"n{i + 1}", mac=node_mac(i), ip=node_ip(i), cpus=4, memory=4096)
                  for i in range(count))
    db.update("bench", f"{count} nodes", lambda cluster: validated(
        dataclasses.replace(cluster, settings=settings, nodes=nodes)))
    return db


@dataclasses.dataclass(frozen=True)
class PerfResult:
    rate: int
    sent: int
    received: int
    drops: int
    dora_per_second: float


_DROPS = re.compile(r"^drops: (\d+)", re.M)
_SENT = re.compile(r"^sent packets: (\d+)", re.M)
_RECEIVED = re.compile(r"^received packets: (\d+)", re.M)
_RATE = re.compile(r"^Rate: ([\d.]+) 4-way exchanges/second", re.M)


def perfdhcp(client: Namespace, macs: Path, count: int, rate: int, seconds: float,
             timeout: float) -> PerfResult:
    """One bounded perfdhcp run: `rate` DORA/s for up to `seconds`."""
    cmd = ["perfdhcp", "-4", "-l", "eth0", "-M", str(macs), "-R", str(count), "-r", str(rate),
           "-n", str(int(rate * seconds)), "-p", str(int(seconds) + 2), "-W", "200000",
           "-d", "2"]
    out = client.run(cmd, check=False, timeout=timeout).stdout
    drops = [int(d) for d in _DROPS.findall(out)]
    sent = [int(s) for s in _SENT.findall(out)]
    received = [int(r) for r in _RECEIVED.findall(out)]
    rates = _RATE.findall(out)
    if len(drops) < 2 or not sent or not rates:
        raise RuntimeError(f"perfdhcp printed no statistics:\n{out}")
    return PerfResult(rate=rate, sent=sum(sent), received=sum(received), drops=sum(drops),
                      dora_per_second=float(rates[0]))
