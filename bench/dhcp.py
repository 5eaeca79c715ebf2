"""DHCP benchmark: perfdhcp against our replica, dnsmasq and ISC Kea, side by side, one run.

    python -m virtualinux.bench.dhcp [--sizes 1000,10000] [--seconds 4] [--repeat 3]

For each size N it makes a database of N nodes, and the same N MAC -> IP reservations for the
peers, then finds each server's highest perfdhcp rate (DORA exchanges per second) with no
drops, stepping `-r` up. Like for like:

- the same work: ours keeps no lease state; `dnsmasq --leasefile-ro` and Kea's memfile with
  `persist: false` keep leases in memory only. The row "dnsmasq, lease file on disk" (fsync on
  every change) is shown apart, as what a default dnsmasq costs; it is not a headline peer.
- the same state: every server is restarted before every step, so each starts from no leases;
- the same receive buffer: the peers keep the kernel's default (net.core.rmem_default, which
  cannot be set inside a namespace), and so does ours: `--set dhcp.receive_buffer=0` (its
  product default asks for 4 MiB); `--ours-receive-buffer` gives ours another, and
  `--rmem-default` sets the default of every server for the run;
- the same CPUs: servers on CPU 1, perfdhcp on CPU 0; servers interleaved step by step.
- `--cpu-cap 0.125` adds rows where every server is held to the same quota, an eighth of a
  CPU (a fresh cgroup per server run, `bench/cgroup.py`): with a whole CPU a fast server is
  limited by perfdhcp on its one CPU (11,000-15,000 DORA/s here), with the cap by itself
  again. `--capped-only` leaves the whole-CPU rows out.

Each server's best clean rate is then run `--repeat` times in all (median, min, max). The
headline is ours against the best peer row. Everything runs in network namespaces this script
makes and removes; every perfdhcp run is bounded in time. Needs root. `cluster_database` is
also used by the tests to make big clusters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from virtualinux.bootsvc.status import read_status
from virtualinux.vm_test.netns import Namespace, Netns
from virtualinux.vvcm import Database, Node, Settings
from virtualinux.vvcm.changes import validated

from . import common
from .cgroup import CgroupError, CpuCaps, describe, find_cpu_hierarchy
from .common import CLIENT_CPU, SERVER_CPU, Stat, cpu_seconds, pinned

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
    server_cpu_seconds: float = 0.0   # what the server process used during the run

    @property
    def cpu_us_per_dora(self) -> float:
        exchanges = self.received / 2   # a DORA is two answers: OFFER and ACK
        return self.server_cpu_seconds / exchanges * 1e6 if exchanges else 0.0


_DROPS = re.compile(r"^drops: (\d+)", re.M)
_SENT = re.compile(r"^sent packets: (\d+)", re.M)
_RECEIVED = re.compile(r"^received packets: (\d+)", re.M)
_RATE = re.compile(r"^Rate: ([\d.]+) 4-way exchanges/second", re.M)


def perfdhcp(client: Namespace, macs: Path, count: int, rate: int, seconds: float,
             timeout: float) -> PerfResult:
    """One bounded perfdhcp run: `rate` DORA/s for up to `seconds`."""
    cmd = pinned(CLIENT_CPU, [
        "perfdhcp", "-4", "-l", "eth0", "-M", str(macs), "-R", str(count), "-r", str(rate),
        "-n", str(int(rate * seconds)), "-p", str(int(seconds) + 2), "-W", "200000",
        "-d", "2"])
    out = client.run(cmd, check=False, timeout=timeout).stdout
    drops = [int(d) for d in _DROPS.findall(out)]
    sent = [int(s) for s in _SENT.findall(out)]
    received = [int(r) for r in _RECEIVED.findall(out)]
    rates = _RATE.findall(out)
    if len(drops) < 2 or not sent or not rates:
        raise RuntimeError(f"perfdhcp printed no statistics:\n{out}")
    return PerfResult(rate=rate, sent=sum(sent), received=sum(received), drops=sum(drops),
                      dora_per_second=float(rates[0]))


RATE_STEPS = (500, 1000, 2000, 3000, 4000, 6000, 8000, 10000, 12000, 16000, 20000, 25000,
              30000, 40000)
REFINE_STEPS = 2    # bisections between the last clean rate and the first with drops
MIN_RATE = 16       # below this a server is reported as having no clean rate
DOMAIN = "cluster.lab"


@dataclasses.dataclass(frozen=True)
class Server:
    """One server under test: `start(work)` returns its running, ready process in the
    server namespace; `headline` says whether it does the same work as ours."""

    name: str
    start: Callable[[Path], subprocess.Popen]
    headline: bool = True


@dataclasses.dataclass
class Sweep:
    """One server's way up the rate steps."""

    server: Server
    caps: CpuCaps | None = None      # None: the server has CPU 1 to itself
    best: PerfResult | None = None
    failed: int | None = None
    repeats: list[PerfResult] = dataclasses.field(default_factory=list)
    peak_rss_kib: int = 0
    counters: dict = dataclasses.field(default_factory=dict)


def name_servers() -> str:
    return ",".join(str(node_ip(i)) for i in range(1, 4))


def write_hosts(work: Path, count: int) -> Path:
    hosts = work / "dnsmasq.hosts"
    hosts.write_text("".join(f"{node_mac(i)},{node_ip(i)},n{i + 1}\n" for i in range(count)))
    return hosts


def dnsmasq_command(work: Path, count: int, lease_file: Path | None) -> list[str]:
    """dnsmasq answering like ours: router, name servers, domain, host name, lease time.
    `lease_file` None: `--leasefile-ro`, leases in memory only."""
    leases = [f"--dhcp-leasefile={lease_file}"] if lease_file else ["--leasefile-ro"]
    return ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--no-ping",
            "--user=root", "--pid-file", "--interface=eth0", "--dhcp-authoritative",
            f"--dhcp-range={CIDR.network_address},static,{CIDR.netmask},1h",
            f"--dhcp-hostsfile={work / 'dnsmasq.hosts'}", *leases,
            f"--dhcp-lease-max={count + 100}", f"--domain={DOMAIN}",
            f"--dhcp-option=3,{GATEWAY_VIP}", f"--dhcp-option=6,{name_servers()}",
            "--quiet-dhcp"]


def kea_config(count: int) -> dict:
    """Kea with the same reservations and options; leases in memory only (memfile,
    persist false); one thread, as ours and dnsmasq have."""
    return {"Dhcp4": {
        "interfaces-config": {"interfaces": ["eth0"], "dhcp-socket-type": "raw"},
        "lease-database": {"type": "memfile", "persist": False},
        "multi-threading": {"enable-multi-threading": False},
        "valid-lifetime": 3600, "authoritative": True,
        "host-reservation-identifiers": ["hw-address"],
        "reservations-global": False, "reservations-in-subnet": True,
        "reservations-out-of-pool": True,   # no pools: every address is reserved
        "option-data": [{"name": "routers", "data": str(GATEWAY_VIP)},
                        {"name": "domain-name-servers", "data": name_servers()},
                        {"name": "domain-name", "data": DOMAIN}],
        "subnet4": [{"id": 1, "subnet": str(CIDR), "reservations": [
            {"hw-address": node_mac(i), "ip-address": str(node_ip(i)),
             "hostname": f"n{i + 1}"} for i in range(count)]}],
        "loggers": [{"name": "kea-dhcp4", "severity": "INFO",
                     "output_options": [{"output": "stdout"}]},
                    {"name": "kea-dhcp4.leases", "severity": "WARN",
                     "output_options": [{"output": "stdout"}]}]}}


def servers(work: Path, namespace: Namespace, count: int, receive_buffer: int,
            baseline: str | None = None) -> list[Server]:
    db = cluster_database(work / "cluster.db", count)
    (work / "tree").mkdir(exist_ok=True)
    write_hosts(work, count)
    (work / "kea.json").write_text(json.dumps(kea_config(count)))
    (work / "kea").mkdir(exist_ok=True)
    kea_env = {**os.environ, "KEA_PIDFILE_DIR": str(work / "kea"),
               "KEA_LOCKFILE_DIR": str(work / "kea")}

    def ours(_: Path, state: str = "state", env: dict[str, str] | None = None
             ) -> subprocess.Popen:
        return common.start_ours(namespace, {
            "db": db.path, "root": work / "tree", "address": str(SERVER_ADDRESS),
            "services": ["dhcp"], "state_dir": work / state,
            "settings": {"dhcp.receive_buffer": receive_buffer}}, log=work / f"{state}.log",
            env=env)

    before = []
    if baseline:
        env = common.baseline_env(baseline, work)
        before = [Server(f"virtualinux-before ({baseline})",
                         lambda w: ours(w, "state-before", env), headline=False)]

    def logged(cmd: list[str], log: Path, ready: str, env=None) -> subprocess.Popen:
        process = namespace.popen(pinned(SERVER_CPU, cmd), stdout=log.open("w"),
                                  stderr=subprocess.STDOUT, env=env)
        _wait_ready(lambda: ready in log.read_text(errors="replace"), process, log)
        return process

    def dnsmasq_ro(_: Path) -> subprocess.Popen:
        return logged(dnsmasq_command(work, count, None), work / "dnsmasq.log", "started")

    def dnsmasq_disk(_: Path) -> subprocess.Popen:
        leases = work / "dnsmasq.leases"
        leases.unlink(missing_ok=True)
        return logged(dnsmasq_command(work, count, leases), work / "dnsmasq.log", "started")

    def kea(_: Path) -> subprocess.Popen:
        return logged(["kea-dhcp4", "-c", str(work / "kea.json")], work / "kea.log",
                      "DHCP4_STARTED", env=kea_env)

    return [Server("virtualinux", ours), *before, Server("dnsmasq --leasefile-ro", dnsmasq_ro),
            Server("kea-dhcp4, memfile persist false", kea),
            Server("dnsmasq, lease file on disk", dnsmasq_disk, headline=False)]


def measure(sweep: Sweep, work: Path, client: Namespace, server_ns: Namespace, count: int,
            rate: int, seconds: float, log) -> PerfResult:
    """One perfdhcp run at `rate` against a freshly started server (no leases yet), held to
    its sweep's CPU cap if it has one."""
    process = sweep.server.start(work)
    throttled = ""
    try:
        pid = _server_pid(process)
        with contextlib.ExitStack() as stack:
            capped = stack.enter_context(sweep.caps.capped(pid)) if sweep.caps else None
            before, cpu_before = socket_drops(server_ns), cpu_seconds(pid)
            result = perfdhcp(client, work / "macs", count, rate, seconds,
                              timeout=seconds + 20)
            if capped is not None:
                periods, hit = capped.throttled()
                throttled = f", quota hit in {hit} of {periods} periods"
        result = dataclasses.replace(result, server_cpu_seconds=cpu_seconds(pid) - cpu_before)
        kernel = socket_drops(server_ns) - before
        sweep.peak_rss_kib = max(sweep.peak_rss_kib, peak_rss_kib(pid))
    finally:
        common.stop(process)
    if sweep.server.name == "virtualinux":
        sweep.counters = read_status(work / "state").counters("dhcp")
    log(f"    {sweep.server.name:<34} -r {rate:>6}: {result.dora_per_second:>8.0f} DORA/s, "
        f"{result.drops} drops ({kernel} in port 67's receive queue), server CPU "
        f"{result.cpu_us_per_dora:.0f} us/DORA{throttled}")
    return result


def _server_pid(process: subprocess.Popen) -> int:
    """The server's own pid: nsenter and taskset exec it, so it is the child we started."""
    return process.pid


def sweep_all(sweeps: list[Sweep], work: Path, client: Namespace, server_ns: Namespace,
              count: int, seconds: float, steps: tuple[int, ...], log,
              refine: int = REFINE_STEPS) -> None:
    """Up the steps, all servers at each step before the next; a step with drops is run once
    more before it counts as failed (the machine is shared), the same for every server."""
    def clean(sweep: Sweep, rate: int) -> bool:
        for _ in (1, 2):
            result = measure(sweep, work, client, server_ns, count, rate, seconds, log)
            if not result.drops and result.received >= result.sent:
                sweep.best = result
                return True
        sweep.failed = rate
        return False

    for rate in steps:
        running = [s for s in sweeps if s.failed is None]
        if not running:
            break
        log(f"  step -r {rate}")
        for sweep in running:
            clean(sweep, rate)
    for sweep in sweeps:    # even the first step had drops: halve until one is clean
        rate = steps[0] // 2
        while sweep.best is None and rate >= MIN_RATE and not clean(sweep, rate):
            rate //= 2
    for _ in range(refine):
        for sweep in sweeps:
            if sweep.failed is None:
                continue
            low = sweep.best.rate if sweep.best else 0
            rate = (low + sweep.failed) // 2
            if rate > low:
                clean(sweep, rate)


RMEM_DEFAULT = Path("/proc/sys/net/core/rmem_default")


@contextlib.contextmanager
def rmem_default(value: int | None):
    """The host's default receive buffer set to `value` for the block (None: left alone)."""
    if value is None:
        yield
        return
    old = RMEM_DEFAULT.read_text()
    RMEM_DEFAULT.write_text(f"{value}\n")
    try:
        yield
    finally:
        RMEM_DEFAULT.write_text(old)


def kernel_receive_buffer(namespace: Namespace) -> int:
    return int(namespace.run(["cat", "/proc/sys/net/core/rmem_default"]).stdout)

def socket_drops(server: Namespace) -> int:
    """Datagrams the kernel dropped because UDP port 67's receive queue was full."""
    total = 0
    for line in server.run(["cat", "/proc/net/udp"]).stdout.splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":0043"):
            total += int(fields[-1])
    return total


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


@contextlib.contextmanager
def segment():
    """A server and a client namespace on one bridge; everything is removed afterwards."""
    with Netns(prefix="vb") as netns:
        hub = netns.namespace("hub")
        bridge = netns.bridge(hub)
        server = netns.namespace("srv")
        client = netns.namespace("cli")
        netns.plug(hub, bridge, server, address=f"{SERVER_ADDRESS}/{CIDR.prefixlen}")
        netns.plug(hub, bridge, client, address=f"{CLIENT_ADDRESS}/{CIDR.prefixlen}")
        yield server, client




def _wait_ready(ready, process: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            common.stop(process)
            raise RuntimeError(f"server did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.05)


def run_size(count: int, seconds: float, repeat: int, steps: tuple[int, ...],
             receive_buffer: int | None, log, baseline: str | None = None,
             caps: list[CpuCaps | None] | None = None,
             refine: int = REFINE_STEPS) -> list[list[Sweep]]:
    """Every server's sweep at `count` MACs, once per entry of `caps` (None: a whole CPU)."""
    with tempfile.TemporaryDirectory(prefix="bench-dhcp-") as tmp, segment() as (server, client):
        work = Path(tmp)
        (work / "macs").write_text("".join(node_mac(i) + "\n" for i in range(count)))
        # 0: ours sets no SO_RCVBUF and gets the kernel's default, like the peers.
        buffer = receive_buffer or 0
        log(f"{count} known MACs; " + (
            f"ours asks for a {buffer}-byte receive buffer ({2 * buffer} granted), "
            f"the peers keep the kernel's default ({kernel_receive_buffer(server)})" if buffer
            else f"every server has the kernel's default receive buffer "
                 f"({kernel_receive_buffer(server)} bytes)"))
        under_test = servers(work, server, count, buffer, baseline)
        groups = []
        for cap in caps or [None]:
            log(f" {describe(cap.cap if cap else None)}")
            sweeps = [Sweep(s, cap) for s in under_test]
            sweep_all(sweeps, work, client, server, count, seconds, steps, log, refine)
            for sweep in sweeps:
                if sweep.best:
                    sweep.repeats.append(sweep.best)
            for _ in range(repeat - 1):
                for sweep in sweeps:
                    if sweep.best:
                        sweep.repeats.append(measure(sweep, work, client, server, count,
                                                     sweep.best.rate, seconds, log))
            if sweeps[0].counters:
                log("  our counters (last run): " + ", ".join(
                    f"{k} {v}" for k, v in sweeps[0].counters.items()))
            groups.append(sweeps)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.dhcp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000",
                        help="known MACs per run, comma-separated (default: 1000,10000)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="length of each perfdhcp step (default: 4)")
    parser.add_argument("--max-rate", type=int, default=RATE_STEPS[-1],
                        help=f"highest -r step (default: {RATE_STEPS[-1]})")
    parser.add_argument("--ours-receive-buffer", type=int, metavar="BYTES",
                        help="SO_RCVBUF for ours, `--set dhcp.receive_buffer` (default: "
                             "none, the kernel's default, what the peers get)")
    parser.add_argument("--rmem-default", type=int, metavar="BYTES",
                        help="set the host's net.core.rmem_default for the run (every "
                             "server's buffer; it cannot be set per namespace), restored after; "
                             "it touches every socket made on the host meanwhile")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run our server of this git revision (e.g. main), "
                             "interleaved, as virtualinux-before (not a peer)")
    parser.add_argument("--cpu-cap", metavar="CPUS",
                        help="also run every server held to this fraction of a CPU (a "
                             "cgroup quota, the same for all), e.g. 0.25; comma-separated for "
                             "several")
    parser.add_argument("--cpu-period-us", type=int, metavar="US",
                        help="the quota's period (default: the shortest the kernel allows "
                             "for the cap, whose quota is 1 ms: 8000 us at 0.125)")
    parser.add_argument("--capped-only", action="store_true",
                        help="only the --cpu-cap rows, not the whole-CPU ones")
    parser.add_argument("--refine", type=int, default=REFINE_STEPS,
                        help="bisections between a server's last clean step and the first "
                             f"with drops (default: {REFINE_STEPS})")
    common.add_flags(parser)
    args = parser.parse_args(argv)
    common.apply_flags(args)
    if os.geteuid() != 0:
        print("bench/dhcp: needs root (network namespaces, port 67, cgroups)", file=sys.stderr)
        return 2
    sizes = [int(size) for size in args.sizes.split(",")]
    if max(sizes) > CIDR.num_addresses - 512:
        print(f"bench/dhcp: at most {CIDR.num_addresses - 512} MACs", file=sys.stderr)
        return 2
    if args.capped_only and not args.cpu_cap:
        print("bench/dhcp: --capped-only needs --cpu-cap", file=sys.stderr)
        return 2
    steps = tuple(r for r in RATE_STEPS if r <= args.max_rate) or RATE_STEPS[:1]
    report = common.Report("dhcp", argv if argv is not None else sys.argv[1:])
    with contextlib.ExitStack() as stack:
        try:
            settings = cpu_caps(stack, args.cpu_cap, args.cpu_period_us, args.capped_only)
        except (CgroupError, ValueError) as err:
            print(f"bench/dhcp: --cpu-cap: {err}", file=sys.stderr)
            return 2
        stack.enter_context(rmem_default(args.rmem_default))
        results = [(count, run_size(count, args.seconds, args.repeat, steps,
                                    args.ours_receive_buffer,
                                    lambda line: print(line, flush=True), args.baseline,
                                    settings, args.refine))
                   for count in sizes]
    rows, ratios = [], []
    for count, groups in results:
        for sweeps in groups:
            rows += table_rows(count, sweeps)
            ratios += headline(count, sweeps)
    report.table("DHCP: highest perfdhcp rate with 0 drops; each server restarted per step",
                 ["known MACs", "server", "CPU", "highest clean -r", "ceiling",
                  "DORA/s measured", "drops in the repeats", "server CPU us/DORA",
                  "peak RSS"], rows)
    for line in ratios:
        report.note(line)
    buffer = args.rmem_default or int(RMEM_DEFAULT.read_text())
    ours_buffer = (f"ours asks for {args.ours_receive_buffer}, which the kernel doubles"
                   if args.ours_receive_buffer else "ours too: --set dhcp.receive_buffer=0")
    periods = ", ".join(f"{caps.quota_us} us per {caps.period_us} us" for caps in settings
                        if caps is not None)
    capped = (f"; CPU-capped rows: each server run in a fresh cgroup held to the cap "
              f"({periods}, all its threads)" if periods else "")
    report.note(f"every server's receive buffer: {buffer} bytes (net.core.rmem_default"
                f"{', set for the run' if args.rmem_default else ''}; {ours_buffer}); "
                f"servers on CPU {SERVER_CPU}, perfdhcp on CPU "
                f"{CLIENT_CPU}{capped}; 'dnsmasq, lease file on disk' does more work (fsync per "
                "lease) and is not a headline peer")
    report.finish(args.json)
    return 0


def cpu_caps(stack: contextlib.ExitStack, spec: str | None, period_us: int | None,
             capped_only: bool) -> list[CpuCaps | None]:
    """The CPU setting of each group of rows (None: a whole CPU); the cgroups' parents are
    removed when `stack` closes."""
    groups: list[CpuCaps | None] = [] if capped_only else [None]
    if spec:
        hierarchy = find_cpu_hierarchy()
        for cap in (float(value) for value in spec.split(",")):
            groups.append(stack.enter_context(CpuCaps(
                hierarchy, cap, period_us, name=f"vlx-bench-{os.getpid()}-{len(groups)}")))
    return groups


def table_rows(count: int, sweeps: list[Sweep]) -> list[list[object]]:
    rows: list[list[object]] = []
    for sweep in sweeps:
        best = sweep.best
        rates = Stat.of([r.dora_per_second for r in sweep.repeats]) if best else None
        cpu = Stat.of([r.cpu_us_per_dora for r in sweep.repeats]) if best else None
        ceiling = ("above top step" if best and sweep.failed is None else
                   f"drops at {sweep.failed}" if sweep.failed else "-")
        drops = sum(r.drops for r in sweep.repeats[1:])
        rows.append([count, sweep.server.name, describe(sweep.caps.cap if sweep.caps else None),
                     best.rate if best else None, ceiling, rates,
                     drops if len(sweep.repeats) > 1 else None, cpu,
                     f"{sweep.peak_rss_kib / 1024:.1f} MiB"])
    return rows


def headline(count: int, sweeps: list[Sweep]) -> list[str]:
    """Ours against the best peer row (and against --baseline), for one group of rows."""
    lines = []
    where = f"{count} MACs, {describe(sweeps[0].caps.cap if sweeps[0].caps else None)}"
    ours, peers = sweeps[0], [s for s in sweeps[1:] if s.server.headline and s.best]
    if ours.best and peers:
        median = Stat.of([r.dora_per_second for r in ours.repeats]).median
        strongest = max(peers, key=lambda s: Stat.of(
            [r.dora_per_second for r in s.repeats]).median)
        theirs = Stat.of([r.dora_per_second for r in strongest.repeats]).median
        lines.append(f"{where}: virtualinux / {strongest.server.name} (the best peer row) = "
                     f"{median / theirs:.2f}x DORA/s at 0 drops (goal 2x)")
    earlier = [s for s in sweeps if s.server.name.startswith("virtualinux-before")]
    if ours.best and earlier and earlier[0].best:
        cpu_now = Stat.of([r.cpu_us_per_dora for r in ours.repeats]).median
        cpu_then = Stat.of([r.cpu_us_per_dora for r in earlier[0].repeats]).median
        rate_now = Stat.of([r.dora_per_second for r in ours.repeats]).median
        rate_then = Stat.of([r.dora_per_second for r in earlier[0].repeats]).median
        lines.append(f"{where}: virtualinux / {earlier[0].server.name}: server CPU per DORA "
                     f"{cpu_now:.1f} / {cpu_then:.1f} us = {cpu_now / cpu_then:.2f}x; "
                     f"DORA/s {rate_now / rate_then:.2f}x")
    return lines


if __name__ == "__main__":
    sys.exit(common.run(main))
