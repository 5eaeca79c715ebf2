"""Gateway failover benchmark: our VRRP pair against a keepalived pair, side by side, one run.

    python -m virtualinux.bench.failover [--kills 20] [--intervals 1,0.1]

For each advertisement interval, in one set of namespaces (vm_test.vrrp_pair), rounds
alternate between our pair and a keepalived pair (`vrrp_version 3`, same VRID, VIP, interval
and priorities 200/100): start both routers, wait until the primary holds the VIP and the backup
has heard it, SIGKILL the primary, and time until a ping of the VIP from the client namespace
is answered from the backup's MAC (the prober pings every 5 ms). Takeover is at least the
backup's master-down interval (3 intervals plus its skew: 3.61 s at 1 s, 0.361 s at 0.1 s).
Prints median and max per pair, the ratio ours/keepalived, and the load average before and
after (the machine may be shared). Needs root; everything stays in namespaces it removes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError
from virtualinux.bench import common
from virtualinux.vm_test.netns import Namespace, Netns
from virtualinux.vm_test.vrrp_pair import (
    BACKUP,
    PRIMARY,
    PairLab,
    Speaker,
    probe_result,
    start_probe,
)
from virtualinux.vm_test.wait import wait_for

KINDS = ("ours", "keepalived")
TIMEOUT = 60.0        # bound on every wait of a round


def settle(primary: Speaker, backup: Speaker, interval: float) -> None:
    wait_for(lambda: not primary.running() or (primary.state() == "master"
                                               and primary.holds_vip()),
             TIMEOUT, f"{primary.kind} primary to hold the VIP")
    wait_for(lambda: not backup.running() or (backup.state() == "backup"
                                              and not backup.holds_vip()),
             TIMEOUT, f"{backup.kind} backup to be backup")
    if not (primary.running() and backup.running()):
        raise AssertionError(f"a {primary.kind} router exited")
    # Both kinds get the same grace: three advertisements heard by the backup.
    time.sleep(3 * interval)


def one_takeover(lab: PairLab, kind: str) -> float:
    primary, backup = lab.speaker(PRIMARY, kind), lab.speaker(BACKUP, kind)
    try:
        primary.start()
        backup.start()
        try:
            settle(primary, backup, lab.interval)
        except AssertionError as err:
            tails = "\n".join(f"--- {s.log.name}\n{s.log.read_text()[-1500:]}"
                              for s in (primary, backup) if s.log.exists())
            raise RuntimeError(f"{err}\n{tails}") from None
        probe = start_probe(lab.client, backup.mac, TIMEOUT)
        killed = time.monotonic()
        primary.kill()
        replied = probe_result(probe)
        if replied is None:
            raise RuntimeError(f"{kind}: the VIP never answered from the backup")
        return replied - killed
    finally:
        backup.stop()
        primary.kill()
        for speaker in (primary, backup):
            speaker.drop_vip()      # the killed master's namespace still holds it
        lab.speakers.clear()
        forget_neighbours(lab.client, "eth0")


def forget_neighbours(ns: Namespace, ifname: str) -> None:
    """The client's ARP cache emptied (`ip neigh flush`, over netlink): the next round learns
    the VIP's MAC afresh."""
    with ns.netlink() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for neighbour in ipr.get_neighbours(ifindex=index):
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", ifindex=index, dst=neighbour.get_attr("NDA_DST"))


def run(kills: int, intervals: list[float], log=print) -> list[tuple]:
    rows = []
    for interval in intervals:
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        with tempfile.TemporaryDirectory(prefix="vlx-failover-") as tmp, \
                Netns(prefix="bf") as netns:
            lab = PairLab(netns, Path(tmp), interval)
            try:
                for round_number in range(kills):
                    for kind in KINDS if round_number % 2 == 0 else reversed(KINDS):
                        took = one_takeover(lab, kind)
                        times[kind].append(took)
                        log(f"interval {interval:g} s, kill {round_number + 1}/{kills}, "
                            f"{kind}: {took * 1000:.0f} ms")
            finally:
                lab.close()
        medians = {kind: statistics.median(times[kind]) for kind in KINDS}
        maxima = {kind: max(times[kind]) for kind in KINDS}
        for kind in KINDS:
            rows.append((interval, kind, kills, medians[kind], maxima[kind]))
        rows.append((interval, "ratio ours/keepalived", kills,
                     medians["ours"] / medians["keepalived"],
                     maxima["ours"] / maxima["keepalived"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.failover")
    parser.add_argument("--kills", type=int, default=20, help="kills per pair and interval")
    parser.add_argument("--intervals", default="1,0.1",
                        help="advertisement intervals in seconds (default: 1,0.1)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    intervals = [float(x) for x in args.intervals.split(",")]
    before = os.getloadavg()
    rows = run(args.kills, intervals, log=lambda line: print(line, file=sys.stderr))
    after = os.getloadavg()
    print(f"load average before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
          f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'interval':>8}  {'pair':<22} {'kills':>5}  {'median':>9}  {'max':>9}")
    for interval, kind, kills, median, worst in rows:
        if kind.startswith("ratio"):
            print(f"{interval:>7g}s  {kind:<22} {kills:>5}  {median:>9.2f}  {worst:>9.2f}")
        else:
            print(f"{interval:>7g}s  {kind:<22} {kills:>5}  {median * 1000:>7.0f}ms  "
                  f"{worst * 1000:>7.0f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
