"""DNS benchmark: dnsperf against our replica, dnsmasq and unbound, side by side, in one run.

    python -m virtualinux.bench.dns [--sizes 1000,10000] [--seconds 3] [--max-rate 160000]
                                    [--baseline REV] [--profile SECONDS]

For each size N it makes a database of N nodes (bench.dhcp.cluster_database) and gives
dnsmasq (`addn-hosts`) and unbound (`local-data`, `local-data-ptr`) the same names, all three
forwarding everything else to one dnsmasq in an upstream namespace that answers
*.example.test (TTL 3600). Two query sets: cluster names (A for every node and PTR for every
address, shuffled) and cached external names (1,000 names under example.test, asked once
before the measured runs so every server has them cached). Each server runs in its own
namespace pinned to CPU 1 (taskset), dnsperf to CPU 0, each with the kernel's default UDP
receive buffer (ours is told so: its own default of 4 MiB would turn stalls into latency where
the peers lose queries). The rate steps are interleaved (ours, dnsmasq, unbound at one rate,
then the next rate) so the shared machine's load hits all three alike. Reported: the highest
dnsperf -Q with no query lost and at least 90% of it completed (a failed step is run once
more before it counts), the queries/s and mean latency dnsperf measured there, the server's
CPU time per query in that run (which a busy machine disturbs least), and each server's peak
RSS; then our ratio against the stronger peer. Last, per query set, every server is flooded
in turn at --max-rate, --floods rounds interleaved: the queries/s it answered (lost ones or
not) and its CPU per answer, medians of the rounds,
its capacity for the CPU share it got (on a busy machine the clean rates above mostly measure
scheduling stalls).
With --baseline REV our server of git revision REV (of this checkout) runs as a fourth
server, `virtualinux-before`, interleaved with the others like a peer, so a change of ours is
measured against its predecessor in the same conditions (its source is `git archive`d into the
run's temporary directory and put first on its PYTHONPATH).
Needs root. With --profile SECONDS, py-spy (if installed) samples our server under a fixed
load afterwards and prints where the time goes: the share of samples each function is on the
stack, and the lines the samples were taken in (self time: a line that calls into C, a
system call for one, holds that call's time too).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtualinux.vm_test.netns import Namespace, Netns
from virtualinux.vvcm import changes

from . import common
from .common import CLIENT_CPU, SERVER_CPU, cpu_seconds, ours_command, pinned, settings_of
from .dhcp import cluster_database, node_ip, peak_rss_kib

CLIENT = "198.18.0.200"
SERVERS = {"virtualinux": "198.18.0.201", "dnsmasq": "198.18.0.202", "unbound": "198.18.0.203",
           "virtualinux-before": "198.18.0.204"}
UPSTREAM = "198.18.0.210"
PREFIX = 18                      # bench.dhcp's CIDR: room for the node addresses
EXTERNAL_NAMES = 1000
RATE_STEPS = (2000, 5000, 10000, 15000, 20000, 30000, 40000, 60000, 80000, 120000, 160000)
# A step counts only if the server kept up: no query lost and dnsperf completed at least this
# share of the asked rate (a server with a big receive buffer otherwise "loses" nothing while
# its latency grows to tens of milliseconds).
KEPT_UP = 0.9


@dataclasses.dataclass(frozen=True)
class Run:
    rate: int
    sent: int
    lost: int
    qps: float
    latency_ms: float
    cpu_us: float = 0.0          # server CPU per completed query (robust on a busy machine)


@dataclasses.dataclass
class Server:
    name: str
    address: str
    process: subprocess.Popen
    best: dict[str, Run | None] = dataclasses.field(default_factory=dict)
    flooded: dict[str, Run] = dataclasses.field(default_factory=dict)    # at --max-rate
    runs: dict[str, dict[int, Run]] = dataclasses.field(default_factory=dict)   # last per -Q
    done: set[str] = dataclasses.field(default_factory=set)

    @property
    def rss_mib(self) -> float:
        return peak_rss_kib(self.process.pid) / 1024


_FIELDS = {"sent": re.compile(r"Queries sent:\s+(\d+)"),
           "lost": re.compile(r"Queries lost:\s+(\d+)"),
           "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
           "latency": re.compile(r"Average Latency \(s\):\s+([\d.]+)")}


def dnsperf(client: Namespace, server: str, queries: Path, rate: int, seconds: float,
            runs: int | None = None) -> Run:
    cmd = pinned(CLIENT_CPU, client.prefix(
        ["dnsperf", "-s", server, "-d", str(queries), "-t", "1", "-q", "500", "-c", "4",
         "-Q", str(rate), *(["-n", str(runs)] if runs else ["-l", str(seconds)])]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    found = {key: match.group(1) for key, pattern in _FIELDS.items()
             if (match := pattern.search(out)) is not None}
    if len(found) != len(_FIELDS):
        raise RuntimeError(f"dnsperf printed no statistics:\n{out}")
    return Run(rate, int(found["sent"]), int(found["lost"]), float(found["qps"]),
               float(found["latency"]) * 1000)


def query_files(work: Path, count: int) -> dict[str, Path]:
    rng = random.Random(count)
    cluster = [f"n{i + 1}.cluster.lab A" for i in range(count)]
    cluster += [f"{node_ip(i).reverse_pointer} PTR" for i in range(count)]
    rng.shuffle(cluster)
    external = [f"e{i}.example.test A" for i in range(EXTERNAL_NAMES)]
    rng.shuffle(external)
    files = {"cluster names": work / "cluster.queries", "cached external": work / "ext.queries"}
    files["cluster names"].write_text("\n".join(cluster) + "\n")
    files["cached external"].write_text("\n".join(external) + "\n")
    return files


def start_servers(netns: Netns, hub: Namespace, bridge: str, work: Path, count: int,
                  db_path: Path, baseline: str | None = None) -> list[Server]:
    def namespace(role: str, address: str) -> Namespace:
        ns = netns.namespace(role)
        netns.plug(hub, bridge, ns, address=f"{address}/{PREFIX}")
        return ns

    def start_pinned(ns: Namespace, cmd: list[str], log: str,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        # taskset and nsenter exec what follows, so the pid is the server's own.
        return subprocess.Popen(pinned(SERVER_CPU, ns.prefix(cmd)), env=env,
                                stdout=(work / log).open("w"), stderr=subprocess.STDOUT)

    upstream = namespace("up", UPSTREAM)
    upstream_process = start_pinned(upstream, [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--user=root", "--pid-file", f"--listen-address={UPSTREAM}", "--bind-interfaces",
        "--address=/example.test/198.51.100.10", "--local-ttl=3600"], "upstream.log")
    hosts = work / "hosts"
    hosts.write_text("".join(f"{node_ip(i)} n{i + 1}.cluster.lab\n" for i in range(count)))
    unbound_conf = work / "unbound.conf"
    unbound_conf.write_text(unbound_config(count))
    def ours(name: str) -> list[str]:
        return ours_command(db_path, work, SERVERS[name], ["dns"], state_dir=work / name,
                            settings={"dns.rate_limit": 0, "dns.receive_buffer": 0})

    commands = {
        "virtualinux": ours("virtualinux"),
        **({"virtualinux-before": ours("virtualinux-before")} if baseline else {}),
        "dnsmasq": ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
                    "--no-hosts", "--user=root", "--pid-file", f"--server={UPSTREAM}",
                    f"--listen-address={SERVERS['dnsmasq']}", "--bind-interfaces",
                    f"--addn-hosts={hosts}", "--local-ttl=300", "--cache-size=10000",
                    "--dns-forward-max=1000"],
        "unbound": ["unbound", "-d", "-c", str(unbound_conf)],
    }
    servers = []
    try:
        for name, cmd in commands.items():
            ns = namespace(name, SERVERS[name])
            env = None
            if name == "virtualinux-before" and baseline:
                env = common.baseline_env(baseline, work)
            servers.append(Server(name, SERVERS[name],
                                  start_pinned(ns, cmd, f"{name}.log", env)))
        servers.append(Server("upstream", UPSTREAM, upstream_process))
        client = hub
        deadline = time.monotonic() + 180     # 10,000 nodes on a busy, pinned CPU
        for server in servers:
            while True:
                probe = subprocess.run(client.prefix(
                    ["dig", "+time=1", "+tries=1", f"@{server.address}", "n1.cluster.lab"
                     if server.name != "upstream" else "e0.example.test"]),
                    capture_output=True, text=True)
                if "status: NOERROR" in probe.stdout:
                    break
                if server.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} did not start: "
                                       f"{(work / (server.name + '.log')).read_text()[-2000:]}")
                time.sleep(0.2)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def unbound_config(count: int) -> str:
    local = "".join(f'    local-data: "n{i + 1}.cluster.lab. 300 IN A {node_ip(i)}"\n'
                    f'    local-data-ptr: "{node_ip(i)} 300 n{i + 1}.cluster.lab."\n'
                    for i in range(count))
    return f"""server:
    interface: {SERVERS['unbound']}
    port: 53
    do-ip6: no
    username: ""
    chroot: ""
    directory: "/"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    so-reuseport: no
    module-config: "iterator"
    access-control: 198.18.0.0/15 allow
    do-not-query-localhost: no
    msg-cache-size: 32m
    rrset-cache-size: 64m
    local-zone: "cluster.lab." static
    local-zone: "18.198.in-addr.arpa." static
{local}forward-zone:
    name: "."
    forward-addr: {UPSTREAM}
"""


def stop_servers(servers: list[Server]) -> None:
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(10)


def measure(client: Namespace, servers: list[Server], files: dict[str, Path], seconds: float,
            max_rate: int, log=print, floods: int = 3) -> None:
    """Per query set, step the rate up for every server in turn until each loses queries."""
    for label, queries in files.items():
        for server in servers:
            server.best[label] = None
            if label == "cached external":      # fill the cache: one pass, not measured
                dnsperf(client, server.address, queries, 2000, seconds, runs=1)
        log(f"  {label}")
        for rate in (r for r in RATE_STEPS if r <= max_rate):
            for server in servers:
                if label in server.done:
                    continue
                for attempt in (1, 2):
                    run = timed_run(client, server, queries, rate, seconds, log,
                                    ", again" if attempt == 2 else "")
                    server.runs.setdefault(label, {})[rate] = run
                    if run.lost == 0 and run.qps >= KEPT_UP * rate:
                        server.best[label] = run
                        break
                else:
                    server.done.add(label)
        # Capacity: every server flooded at the highest rate in turn, queries lost or not,
        # `floods` rounds; the median round of each. On a busy machine the clean rates above
        # mostly measure stalls; this measures what a server answers per second of the CPU it
        # gets, and what each answer costs then.
        rounds: dict[str, list[Run]] = {server.name: [] for server in servers}
        for _ in range(floods):
            for server in servers:
                rounds[server.name].append(timed_run(client, server, queries, max_rate,
                                                     seconds, log, " (flooded)"))
        for server in servers:
            server.flooded[label] = median_run(rounds[server.name])


def median_run(runs: list[Run]) -> Run:
    """Each figure the median of `runs` (all at one rate)."""
    def median(field: str) -> float:
        return statistics.median(getattr(run, field) for run in runs)
    return Run(runs[0].rate, int(median("sent")), int(median("lost")), median("qps"),
               median("latency_ms"), median("cpu_us"))


def timed_run(client: Namespace, server: Server, queries: Path, rate: int, seconds: float,
              log=print, note: str = "") -> Run:
    """One dnsperf run against `server`, with the server's CPU time per answered query."""
    before = cpu_seconds(server.process.pid)
    run = dnsperf(client, server.address, queries, rate, seconds)
    run = dataclasses.replace(run, cpu_us=(cpu_seconds(server.process.pid) - before)
                              / max(run.sent - run.lost, 1) * 1e6)
    log(f"    {server.name:<12} -Q {rate:>6}: {run.qps:>9.0f} q/s, {run.lost} lost, "
        f"{run.latency_ms:.3f} ms, {run.cpu_us:.1f} us CPU/q{note}")
    return run


def in_process_cost(db_path: Path, rounds: int = 20000) -> tuple[float, float]:
    """CPU microseconds per local answer in this process: our fast path (`respond`, parser and
    assembler, without the reply memo) against dnspython's own path for the same answer
    (from_wire, make_response, a prebuilt RRset, to_wire). This is why the hot path goes
    around dnspython."""
    import dns.message
    import dns.rrset
    from virtualinux.bootsvc.dns import DnsService
    from virtualinux.bootsvc.service import Replica
    from virtualinux.vvcm import Database

    service = DnsService(Replica(None, "lo", ipaddress.IPv4Address(CLIENT), db_path.parent,
                                 db_path.parent), Database(db_path).load())
    query = dns.message.make_query("n1.cluster.lab", "A").to_wire()
    rrset = dns.rrset.from_text("n1.cluster.lab.", 300, "IN", "A", str(node_ip(0)))

    def dnspython_answer() -> bytes:
        reply = dns.message.make_response(dns.message.from_wire(query))
        reply.answer.append(rrset)
        return reply.to_wire()

    costs = []
    for answer, n in ((lambda: service.respond(query, CLIENT, True), rounds),
                      (dnspython_answer, rounds // 10)):
        start = time.process_time()
        for _ in range(n):
            answer()
        costs.append((time.process_time() - start) / n * 1e6)
    return costs[0], costs[1]


def run_size(count: int, seconds: float, max_rate: int, profile: float, log=print,
             baseline: str | None = None, floods: int = 3) -> list:
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp, Netns(prefix="vd") as netns:
        work = Path(tmp)
        db_path = work / "cluster.db"
        db = cluster_database(db_path, count)
        db.update("bench", "upstream", lambda c: changes.set_settings(c, dataclasses.replace(
            settings_of(c), upstream_dns=(ipaddress.IPv4Address(UPSTREAM),))))
        hub = netns.namespace("hub")
        bridge = netns.bridge(hub)
        hub.add_address(bridge, f"{CLIENT}/{PREFIX}")
        files = query_files(work, count)
        ours, theirs = in_process_cost(db_path)
        log(f"  in-process CPU per local answer: ours {ours:.1f} us, dnspython's path "
            f"{theirs:.1f} us ({theirs / ours:.0f}x)")
        servers = start_servers(netns, hub, bridge, work, count, db_path, baseline)
        measured = [s for s in servers if s.name != "upstream"]
        try:
            measure(hub, measured, files, seconds, max_rate, log, floods)
            rows = [(count, server.name, server.best, server.rss_mib, server.runs,
                     server.flooded) for server in measured]
            if profile:
                profile_ours(hub, measured[0], files["cluster names"], profile, work, log)
        finally:
            stop_servers(servers)
    return rows


def profile_ours(client: Namespace, ours: Server, queries: Path, seconds: float, work: Path,
                 log=print) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        log("  (py-spy not installed: `make deps` installs it with the test extras)")
        return
    out = work / "profile.txt"
    recorder = subprocess.Popen([spy, "record", "--pid", str(ours.process.pid), "--duration",
                                 str(int(seconds)), "--format", "raw", "--output", str(out),
                                 "--nonblocking"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    best = ours.best.get("cluster names")
    # Past the best clean rate, so the server is busy all the time being sampled.
    dnsperf(client, ours.address, queries, 4 * best.rate if best else 40000, seconds)
    recorder.wait(seconds + 30)
    totals: dict[str, int] = {}
    leaves: dict[str, int] = {}
    samples = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, on_stack = line.rpartition(" ")
        samples += int(on_stack)
        for frame in set(stack.split(";")):
            function = frame.split(" (")[0]
            totals[function] = totals.get(function, 0) + int(on_stack)
        leaf = stack.split(";")[-1].replace(str(common.REPO) + "/", "")
        leaves[leaf] = leaves.get(leaf, 0) + int(on_stack)
    log(f"  where our time goes ({samples} samples, share of samples a function is on the "
        "stack):")
    shown = [(f, c) for f, c in totals.items() if c < samples]   # not the loop's own frames
    for function, count in sorted(shown, key=lambda kv: -kv[1])[:12]:
        log(f"    {100 * count / max(samples, 1):5.1f}%  {function}")
    log("  the lines the samples were taken in (self time):")
    for leaf, count in sorted(leaves.items(), key=lambda kv: -kv[1])[:12]:
        log(f"    {100 * count / max(samples, 1):5.1f}%  {leaf}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.dns",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="nodes per run (default 1000,10000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each dnsperf step")
    parser.add_argument("--max-rate", type=int, default=RATE_STEPS[-1],
                        help="highest dnsperf -Q tried")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                        help="then profile our server with py-spy for this long")
    parser.add_argument("--floods", type=int, default=3,
                        help="flooded rounds per server and query set (the median is shown)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run our server of this git revision (e.g. main), "
                             "interleaved, as virtualinux-before")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/dns: needs root (network namespaces, port 53)", file=sys.stderr)
        return 2
    missing = [p for p in ("dnsperf", "dnsmasq", "unbound", "taskset", "dig")
               if shutil.which(p) is None]
    if missing:
        print(f"bench/dns: missing {', '.join(missing)} (debian-packages.txt)", file=sys.stderr)
        return 2
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = []
    for count in (int(size) for size in args.sizes.split(",")):
        print(f"{count} nodes", flush=True)
        rows.extend(run_size(count, args.seconds, args.max_rate, args.profile,
                             lambda line: print(line, flush=True), args.baseline,
                             args.floods))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| nodes | server | query set | highest -Q with 0 lost | q/s measured | mean latency "
          "| server CPU per query | peak RSS |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for count, name, best, rss, *_ in rows:
        for label, run in best.items():
            print(f"| {count} | {name} | {label} | {run.rate if run else '-'} | "
                  f"{run.qps if run else 0:.0f} | "
                  f"{f'{run.latency_ms:.3f} ms' if run else '-'} | "
                  f"{f'{run.cpu_us:.1f} us' if run else '-'} | {rss:.1f} MiB |")
    print()
    for count in dict.fromkeys(row[0] for row in rows):
        by_name = {name: (best, runs) for c, name, best, _, runs, _ in rows if c == count}
        floods = {name: flooded for c, name, *_, flooded in rows if c == count}
        for label in by_name["virtualinux"][0]:
            ours = by_name["virtualinux"][0][label]
            peers = [(by_name[p][0][label].qps, p) for p in ("dnsmasq", "unbound")
                     if by_name[p][0][label]]
            if ours and peers:
                qps, peer = max(peers)
                print(f"{count} nodes, {label}: virtualinux / {peer} (the stronger peer) = "
                      f"{ours.qps / qps:.2f}x q/s at 0% lost")
            # CPU per query depends on the rate (batching): compare at one rate all ran.
            common = set.intersection(*(set(runs.get(label, {})) for _, runs in
                                        by_name.values()))
            if common:
                rate = max(common)
                cpu = {name: runs[label][rate].cpu_us for name, (_, runs) in by_name.items()}
                peer_cpu = min(cpu["dnsmasq"], cpu["unbound"])
                print(f"    server CPU per query at -Q {rate}: " + ", ".join(
                    f"{name} {value:.1f} us" for name, value in cpu.items()) +
                    f" (ours / best peer = {cpu['virtualinux'] / peer_cpu:.2f}x" +
                    (f", ours / before = {cpu['virtualinux'] / cpu['virtualinux-before']:.2f}x"
                     if "virtualinux-before" in cpu else "") + ")")
            before = by_name.get("virtualinux-before", ({}, {}))[0].get(label)
            if ours and before:
                print(f"    virtualinux / virtualinux-before ({args.baseline}) = "
                      f"{ours.qps / before.qps:.2f}x q/s at 0% lost")
            flooded = {name: runs[label] for name, runs in floods.items() if label in runs}
            if "virtualinux" in flooded:
                mine = flooded["virtualinux"]
                print(f"    flooded at -Q {args.max_rate}, median of {args.floods}: answered "
                      "q/s (server CPU per answer): " + ", ".join(
                          f"{name} {run.qps:.0f} ({run.cpu_us:.1f} us)"
                          for name, run in flooded.items()))
                others = {name: run for name, run in flooded.items() if name != "virtualinux"}
                if others:
                    print("    virtualinux / " + ", / ".join(
                        f"{name} = {mine.qps / run.qps:.2f}x q/s, "
                        f"{mine.cpu_us / run.cpu_us:.2f}x CPU" for name, run in others.items()))
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
