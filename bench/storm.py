"""Boot storm: N clients against R DHCP replicas, with and without load balancing, measured
here and modelled past what fits on one machine.

    python -m virtualinux.bench.storm [--replicas 6] [--clients 500] [--rate 250] [--k 2]
                                      [--model-replicas 1000] [--model-nodes 1000] [--dead 0.1]

1. Per-packet costs in this process (no network): what the responder spends on a DISCOVER it
   answers without balancing, one it answers as a chosen replica, one it leaves to others, and
   the precompute per client that `reload()` pays when the replica set changes.
2. The storm, measured: R `vlx bootsvc run --node rI` processes, each in its own namespace on
   one bridge, R nodes with role dhcp in the database beside N client nodes; N clients
   (bench/dora_client.py in a client namespace: broadcast DORA like a PXE ROM, paced at
   `--rate`, bounded in time; perfdhcp only sends as a relay, which balancing leaves alone)
   boot once with `dhcp_answering = 0` (every replica answers: the peer row), once with k,
   and once with k and `--dead` of the replicas killed (at least one).
   Printed per run: packets on the wire per DORA (the client's plus every replica's), CPU per
   replica (mean and max, from /proc), client retransmissions and the time for N leases.
3. The model: the CPU per received and per sent packet, fitted to the two measured runs (less
   each replica's idle CPU), extrapolated to `--model-replicas` x `--model-nodes` with 0 and
   `--dead` of the replicas down, for a storm of `--window` seconds (nodes powering on over
   that time) and clients that retransmit after `--retry` seconds (iPXE: 1 s).
Everything runs in namespaces this script makes and removes; needs root.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from virtualinux.bench import common
from virtualinux.bench import dhcp as bench
from virtualinux.bootsvc import dhcp_wire as wire
from virtualinux.bootsvc.dhcp_responder import Responder
from virtualinux.bootsvc.service import Replica
from virtualinux.bootsvc.status import STATUS_FILE, read_status
from virtualinux.vm_test.netns import Netns
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import Database, Node, Settings
from virtualinux.vvcm.changes import validated
from virtualinux.vvcm.command import vlx_command
from virtualinux.vvcm.model import Role

VLX = vlx_command()
FIRST_REPLICA = ipaddress.IPv4Address("198.18.48.1")   # clients use 198.18.1.1 up
MAX_REPLICAS = 100
MAX_CLIENTS = 10000


def replica_name(index: int) -> str:
    return f"r{index + 1}"


def storm_database(path: Path, replicas: int, clients: int, k: int) -> Database:
    """`replicas` nodes with role dhcp at 198.18.48.1.., and `clients` nodes as bench/dhcp
    makes them (MAC `bench.node_mac(i)`, address from 198.18.1.1)."""
    db = Database.create(path)
    settings = Settings(name="storm", domain="cluster.lab", cidr=bench.CIDR,
                        gateway_vip=bench.GATEWAY_VIP, dhcp_answering=k)
    nodes = tuple(Node(name=replica_name(i), mac=f"52:55:00:00:{i >> 8:02x}:{i & 255:02x}",
                       ip=FIRST_REPLICA + i, cpus=4, memory=4096, roles=(Role.DHCP,))
                  for i in range(replicas))
    nodes += tuple(Node(name=f"n{i + 1}", mac=bench.node_mac(i), ip=bench.node_ip(i), cpus=4,
                        memory=4096) for i in range(clients))
    db.update("bench", "storm", lambda c: validated(
        dataclasses.replace(c, settings=settings, nodes=nodes)))
    return db


def set_answering(db: Database, k: int) -> int:
    return db.update("bench", f"k={k}", lambda c: validated(dataclasses.replace(
        c, settings=dataclasses.replace(common.settings_of(c), dhcp_answering=k)))).generation


# ---- 1. per-packet costs, in process ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Costs:
    answer_unbalanced_us: float
    answer_chosen_us: float
    leave_us: float
    reload_per_client_us: float   # at 1,000 replicas


def _per_packet(responders: list[Responder], packets: list[bytes],
                rounds: int = 20) -> list[float]:
    """Microseconds of CPU per packet for each responder, the best of `rounds`; the
    responders take turns, so a burst of load elsewhere hits them alike."""
    best = [float("inf")] * len(responders)
    for _ in range(rounds):
        for index, responder in enumerate(responders):
            started = time.process_time()   # CPU time: the machine is shared
            for packet in packets:
                responder.respond(packet)
            best[index] = min(best[index], (time.process_time() - started) / len(packets))
    return [value * 1e6 for value in best]


def measure_costs(work: Path, replicas: int = 1000, clients: int = 1000) -> Costs:
    db = storm_database(work / "costs.db", replicas, clients, k=2)
    cluster = db.load()
    macs = [wire.parse_mac(bench.node_mac(i)) for i in range(clients)]
    packets = {mac: wire.encode(wire.Message(op=wire.BOOTREQUEST, xid=i, chaddr=mac, options=(
        (wire.OPT_MESSAGE_TYPE, bytes([wire.DISCOVER])),))) for i, mac in enumerate(macs)}
    node = cluster.node(replica_name(0))
    replica = Replica(node=node, interface="eth0", address=node.ip, netboot_root=work,
                      state_dir=work, services=("dhcp",))

    def responder(k: int) -> Responder:
        settings = dataclasses.replace(common.settings_of(cluster), dhcp_answering=k)
        return Responder(dataclasses.replace(cluster, settings=settings), replica, Counter(),
                         log_events=False)
    started = time.process_time()
    balanced = responder(2)
    # Every node of the database is a known client: replicas and clients alike.
    per_client = (time.process_time() - started) / len(cluster.nodes) * 1e6
    balancer = balanced.balancer
    if balancer is None:
        raise RuntimeError(f"{replica_name(0)} does not balance at dhcp_answering=2")
    balancer.transactions.clock = lambda: 0.0   # rounds are not retransmissions
    left = [packets[mac] for mac in macs if not balancer.chosen(mac)]
    # Like for like: the same replica and packets, balancing off (k = 0) and on with every
    # client chosen (k = R), then the clients this replica leaves to others at k = 2.
    unbalanced, chosen = _per_packet([responder(0), responder(replicas)], list(packets.values()))
    return Costs(unbalanced, chosen, _per_packet([balanced], left)[0], per_client)


# ---- 2. the storm, measured ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    k: int
    replicas: int              # live ones
    dead: int
    clients: int
    client_sent: int
    received: list[int]        # per live replica: DISCOVERs and REQUESTs it read
    sent: list[int]            # per live replica: OFFERs, ACKs and NAKs it sent
    leases: int
    retries: int               # client retransmissions
    cpu: list[float]           # per live replica, seconds, less its idle CPU over the run
    seconds: float             # first DISCOVER to last ACK

    @property
    def mode(self) -> str:
        return ("all answer" if self.k == 0 else f"k={self.k}") + (
            f", {self.dead} dead" if self.dead else "")

    @property
    def packets_per_dora(self) -> float:
        return (self.client_sent + sum(self.sent)) / max(self.leases, 1)

    @property
    def answers_per_dora(self) -> float:
        return sum(self.sent) / max(self.leases, 1)


def _counters(state: Path) -> dict[str, int]:
    return read_status(state).counters("dhcp")


def storm(work: Path, replicas: int, clients: int, rate: int, k: int, dead: float,
          retry: float, log=print) -> list[Run]:
    db = storm_database(work / "storm.db", replicas, clients, k=0)
    (work / "macs").write_text("".join(bench.node_mac(i) + "\n" for i in range(clients)))
    runs = []
    with Netns(prefix="vs") as netns:
        hub = netns.namespace("hub")
        bridge = netns.bridge(hub)
        client = netns.namespace("cli")
        netns.plug(hub, bridge, client,
                   address=f"{bench.CLIENT_ADDRESS}/{bench.CIDR.prefixlen}")
        processes, states = [], []
        try:
            for i in range(replicas):
                ns = netns.namespace(f"r{i + 1}")
                netns.plug(hub, bridge, ns, address=f"{FIRST_REPLICA + i}/"
                                                    f"{bench.CIDR.prefixlen}")
                state = work / f"state-{i + 1}"
                processes.append(ns.popen(
                    [*VLX, "--db", str(db.path), "bootsvc", "run", "--interface", "eth0",
                     "--node", replica_name(i), "--state-dir", str(state), "--quiet",
                     "--poll", "0.2"], stdout=(work / f"r{i + 1}.log").open("w"),
                    stderr=subprocess.STDOUT))
                states.append(state)
            wait_for(lambda: all((s / STATUS_FILE).exists() for s in states), 60,
                  "the replicas to start")
            for answering in (0, k):
                generation = set_answering(db, answering) if answering else db.generation()
                wait_for(lambda g=generation: all(read_status(s).generation >= g
                                                  for s in states), 30, "the replicas to reload")
                runs.append(_one_run(client, processes, states, work, answering, clients,
                                     rate, retry, log))
            # Replicas down (powered off, crashed): the rest still serve every client.
            for process in processes[:max(1, round(dead * replicas))]:
                process.kill()
                process.wait(10)
            runs.append(_one_run(client, processes, states, work, k, clients, rate, retry,
                                 log))
        finally:
            for process in processes:
                common.stop(process)
    return runs


def _one_run(client, processes, states, work: Path, k: int, clients: int, rate: int,
             retry: float, log) -> Run:
    live = [(p, s) for p, s in zip(processes, states, strict=True) if p.poll() is None]
    idle_start = [common.cpu_seconds(p.pid) for p, _ in live]
    time.sleep(1.0)   # the idle CPU of each replica (status writes, database polls)
    idle = [common.cpu_seconds(p.pid) - c for (p, _), c in zip(live, idle_start, strict=True)]
    before = [_counters(s) for _, s in live]
    cpu_before = [common.cpu_seconds(p.pid) for p, _ in live]
    timeout = clients / rate + 10 * retry + 10
    started = time.monotonic()
    out = client.run([sys.executable, "-m", "virtualinux.bench.dora_client",
                      str(work / "macs"), "--rate", str(rate), "--timeout", str(timeout),
                      "--retry", str(retry)], timeout=timeout + 30).stdout
    took = time.monotonic() - started
    result = json.loads(out.splitlines()[-1])

    def settled() -> bool:
        return all(sum(_counters(s).get(n, 0) for n in ("DHCPOFFER", "DHCPACK", "DHCPREQUEST",
                                                         "DHCPDISCOVER"))
                   >= sum(b.get(n, 0) for n in ("DHCPOFFER", "DHCPACK", "DHCPREQUEST",
                                                "DHCPDISCOVER")) + clients
                   for (_, s), b in zip(live, before, strict=True))
    try:
        wait_for(settled, 10, "every replica to count the storm")
    except RuntimeError:
        log("    (a replica missed some requests: its receive queue overflowed)")
    time.sleep(0.5)   # one more status write, so the counters are the final ones
    after = [_counters(s) for _, s in live]
    cpu = [common.cpu_seconds(p.pid) - c - i * took
           for (p, _), c, i in zip(live, cpu_before, idle, strict=True)]

    def delta(names: tuple[str, ...]) -> list[int]:
        return [sum(a.get(n, 0) - b.get(n, 0) for n in names)
                for a, b in zip(after, before, strict=True)]
    run = Run(k, len(live), len(processes) - len(live), clients, result["sent"],
              delta(("DHCPDISCOVER", "DHCPREQUEST")), delta(("DHCPOFFER", "DHCPACK", "DHCPNAK")),
              result["leases"], result["retries"], [max(c, 0.0) for c in cpu],
              result["seconds"])
    balanced = ("answered_chosen", "left_to_others", "answered_fallback",
                "fallback_repeated_transaction")
    log("    replica counters, summed: " + ", ".join(
        f"{name} {sum(delta((name,)))}" for name in balanced))
    log(f"  {run.mode}: {run.leases}/{clients} leases in {run.seconds:.1f} s, "
        f"{run.packets_per_dora:.1f} packets/DORA, replica CPU mean "
        f"{sum(run.cpu) / len(run.cpu):.2f} s max {max(run.cpu):.2f} s")
    return run


# ---- 3. the model -------------------------------------------------------------------------

def fit(runs: list[Run]) -> tuple[float, float]:
    """Seconds of CPU per received and per sent packet, least squares over every replica of
    every run (cpu = a * received + b * sent)."""
    sxx = sxy = syy = sxc = syc = 0.0
    for run in runs:
        for x, y, c in zip(run.received, run.sent, run.cpu, strict=True):
            sxx, sxy, syy = sxx + x * x, sxy + x * y, syy + y * y
            sxc, syc = sxc + x * c, syc + y * c
    det = sxx * syy - sxy * sxy
    if det == 0:
        raise RuntimeError("the runs do not tell receiving from sending apart")
    return (syy * sxc - sxy * syc) / det, (sxx * syc - sxy * sxc) / det


@dataclasses.dataclass(frozen=True)
class Row:
    mode: str
    dead: float
    packets_per_dora: float
    answers_per_dora: float    # OFFERs and the ACK
    process_cpu: float         # seconds per live replica: its bootsvc process
    kernel_cpu: float          # seconds per node: dropping the answers meant for others
    cpu_percent: float         # both, of one core, over the storm window
    lease_seconds: float       # until the last client has its lease


def model(replicas: int, nodes: int, k: int, dead: float, receive: float, send: float,
          window: float, retry: float, kernel_drop: float) -> list[Row]:
    """Expected values for a storm of `nodes` clients over `window` seconds. Without
    balancing every live replica answers every DISCOVER. With it, a client's live chosen
    ones answer (k(1-f) on average); one whose k chosen are all dead (probability f^k)
    retransmits after `retry` seconds and is then answered by every live replica. Every
    answer is broadcast (the clients have no address yet), so every node's kernel also
    receives every OFFER and ACK on the segment and drops it (`kernel_drop` each)."""
    live = replicas * (1 - dead)
    rows = []
    for mode in ("all answer", f"k={k}"):
        if mode == "all answer":
            offers, again = live, 0.0
        else:
            again = dead ** k
            offers = k * (1 - dead) + again * live
        per_dora = 1 + again + offers + 2               # DISCOVER(s), OFFERs, REQUEST, ACK
        received = nodes * (2 + again)                  # every broadcast reaches every replica
        sent = nodes * offers / live + nodes / live     # its share of OFFERs, and of ACKs
        process = received * receive + sent * send
        kernel = nodes * (offers + 1) * kernel_drop
        stalled = 1 - (1 - again) ** nodes              # some client waits for its retry
        rows.append(Row(mode, dead, per_dora, offers + 1, process, kernel,
                        100 * (process + kernel) / window,
                        max(window, process + kernel) + (retry if stalled > 0.5 else 0.0)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.storm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=6)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rate", type=int, default=250, help="clients starting per second")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--model-replicas", type=int, default=1000)
    parser.add_argument("--model-nodes", type=int, default=1000)
    parser.add_argument("--dead", type=float, default=0.1)
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds over which the modelled nodes power on")
    parser.add_argument("--retry", type=float, default=1.0,
                        help="a client's first retransmission, seconds (iPXE: 1)")
    parser.add_argument("--kernel-drop-us", type=float, default=1.0,
                        help="assumed CPU for a node's kernel to drop a broadcast DHCP "
                             "answer meant for another machine (not measured here)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/storm: needs root (network namespaces, port 67)", file=sys.stderr)
        return 2
    if not 1 <= args.replicas <= MAX_REPLICAS or not 1 <= args.clients <= MAX_CLIENTS:
        print(f"bench/storm: --replicas 1..{MAX_REPLICAS}, --clients 1..{MAX_CLIENTS}",
              file=sys.stderr)
        return 2
    if not 1 <= args.k <= args.replicas or not 0 <= args.dead < 1:
        print("bench/storm: --k 1..--replicas, --dead 0..<1", file=sys.stderr)
        return 2
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        work = Path(tmp)
        print("per-packet costs in process (1,000 replicas x 1,000 clients):", flush=True)
        costs = measure_costs(work)
        print(f"  answer, no balancing {costs.answer_unbalanced_us:.2f} us; answer as chosen "
              f"{costs.answer_chosen_us:.2f} us "
              f"({costs.answer_chosen_us / costs.answer_unbalanced_us:.2f}x); leave to others "
              f"{costs.leave_us:.2f} us; reload {costs.reload_per_client_us:.0f} us per "
              f"client of the database", flush=True)
        print(f"storm: {args.clients} clients at {args.rate}/s, {args.replicas} replicas",
              flush=True)
        runs = storm(work, args.replicas, args.clients, args.rate, args.k, args.dead,
                     args.retry, lambda line: print(line, flush=True))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| measured | live replicas | clients | leases | packets/DORA | answers/DORA "
          "| client retries | CPU/replica mean | max | time for all leases |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        print(f"| {run.mode} | {run.replicas} | {run.clients} | {run.leases} | "
              f"{run.packets_per_dora:.1f} | {run.answers_per_dora:.1f} | {run.retries} | "
              f"{sum(run.cpu) / len(run.cpu) * 1000:.0f} ms | {max(run.cpu) * 1000:.0f} ms | "
              f"{run.seconds:.1f} s |")
    off, on = runs[:2]
    print(f"\npackets on the wire per DORA, all answer / k={args.k}: "
          f"{off.packets_per_dora / on.packets_per_dora:.2f}x; replica CPU: "
          f"{sum(off.cpu) / max(sum(on.cpu), 1e-9):.2f}x")
    receive, send = fit(runs[:2])
    if receive <= 0 or send <= 0:
        # Too little CPU to fit at these bounds: fall back to the in-process costs.
        receive, send = costs.leave_us / 1e6, costs.answer_unbalanced_us / 1e6
        print("model inputs (fit not usable at these bounds, in-process costs instead): ",
              end="")
    else:
        print("model inputs (fitted to the two runs): ", end="")
    print(f"{receive * 1e6:.1f} us CPU per packet received, {send * 1e6:.1f} us per packet "
          f"sent; storm window {args.window:.0f} s; client retry {args.retry:.0f} s; "
          f"reload {costs.reload_per_client_us:.0f} us per client; assumed "
          f"{args.kernel_drop_us:.1f} us per broadcast answer a node's kernel drops")
    print("(here one kernel floods the bridge to every namespace within the sender's CPU "
          "time, so a sent broadcast costs more than on a real switch)")
    print()
    print(f"| model: {args.model_replicas} replicas x {args.model_nodes} nodes | dead "
          "| packets/DORA | answers/DORA | bootsvc CPU per replica | kernel drops per node "
          "| of one core | time for all leases |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dead in (0.0, args.dead):
        for row in model(args.model_replicas, args.model_nodes, args.k, dead, receive, send,
                         args.window, args.retry, args.kernel_drop_us / 1e6):
            print(f"| {row.mode} | {row.dead:.0%} | {row.packets_per_dora:.1f} | "
                  f"{row.answers_per_dora:.1f} | {row.process_cpu:.2f} s | "
                  f"{row.kernel_cpu:.2f} s | {row.cpu_percent:.1f}% | "
                  f"{row.lease_seconds:.1f} s |")
    reload = args.model_nodes * costs.reload_per_client_us / 1e6
    print(f"\nreload after the replica set changes: {reload:.2f} s per replica for "
          f"{args.model_nodes} clients; other reloads reuse the previous generation's "
          f"decisions")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
