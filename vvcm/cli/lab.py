"""`vlx lab up|status|console|ssh|power-on|down`: the virtual lab (vm-test/) from the command
line.

This module joins the areas the lab needs. By default the lab boots the real node image
(`image.build`, cached): `vm_test.selfhost` makes a SAN, a bootstrap (one replica and the first
etcd member) and the nodes, which then boot each other. With `--image tiny` the inventory goes
into the lab's own database, `image.tiny` builds the busybox boot image (cached),
`netboot.render` renders the tree the replicas serve, and `vm_test.lab` makes the network, the
replicas and the QEMU nodes. A node's install
has no vm_test (image/build.py leaves the lab out of the node wheel): there `vlx` has no `lab`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

try:
    from virtualinux.vm_test import admin, console, lab, plan, qemu, selfhost
    from virtualinux.vm_test.progress import NodeProgress
except ModuleNotFoundError as missing:
    if missing.name is None or not missing.name.startswith("virtualinux.vm_test"):
        raise
    HAVE_LAB = False
else:
    HAVE_LAB = True

from .. import inventory
from ..db import Database
from ..errors import VlxError
from ..host import pid_alive
from ..model import Cluster
from .common import add_verb, print_json, print_table

DEFAULT_TIMEOUT = 600.0
# The lab's nodes print their boot on the first serial port (its log is the progress source).
LAB_KERNEL_ARGS = ("console=ttyS0",)


def register(nouns: argparse._SubParsersAction) -> None:
    if not HAVE_LAB:
        return
    parser = nouns.add_parser("lab", help="the virtual lab: QEMU nodes PXE-booting from "
                                          "replicated boot services",
                              description="Bring up, inspect and remove the virtual lab: QEMU "
                                          "nodes PXE-booting from replicated boot services in "
                                          "network namespaces.")
    default = Path(os.environ.get("VLX_LAB_DIR") or plan.DEFAULT_STATE_DIR)
    parser.add_shared_argument("--state-dir", type=Path, default=default, metavar="DIR",
                               help=f"where the lab keeps its record, database and logs "
                                    f"(default: $VLX_LAB_DIR or {plan.DEFAULT_STATE_DIR})")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    up = add_verb(verbs, "up", cmd_up,
                  help="make the lab network, start the replicas, boot the nodes")
    up.add_argument("--inventory", type=Path, metavar="FILE",
                    help="the cluster to boot (default: the cluster in --db)")
    up.add_argument("--nodes", type=int, metavar="N",
                    help="boot only the first N nodes of the inventory (default: all)")
    up.add_argument("--replicas", type=int, default=plan.DEFAULT_REPLICAS, metavar="N",
                    help=f"boot-service replicas (default: {plan.DEFAULT_REPLICAS})")
    up.add_argument("--firmware", choices=qemu.FIRMWARES, default="bios",
                    help="the nodes' firmware: SeaBIOS or OVMF (UEFI); default bios")
    up.add_argument("--image", choices=("node", "tiny"),
                    help="node: the real node image over iSCSI, booted from a bootstrap, then "
                         "by the nodes themselves (default); tiny: the busybox image, booted "
                         "by replicas beside the nodes (fast; the default with --image-dir)")
    up.add_argument("--image-dir", type=Path, metavar="DIR",
                    help="with --image tiny: boot this vmlinuz + initrd.img instead")
    up.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                    help="one more kernel argument for every node (repeatable)")
    up.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help=f"how long to wait for every node to be ready "
                         f"(default: {DEFAULT_TIMEOUT:g})")
    up.add_argument("--no-wait", action="store_true",
                    help="return once the nodes are powered on")

    add_verb(verbs, "status", cmd_status, help="the lab's nodes and replicas", json=True)

    cons = add_verb(verbs, "console", cmd_console, help="follow a node's serial console (^C stops)")
    cons.add_argument("node", metavar="NODE")
    cons.add_argument("--attach", action="store_true",
                      help="attach to the serial port instead (type into it; Ctrl-] detaches)")
    cons.add_argument("--no-follow", action="store_true",
                      help="print the serial log so far and return")

    add_verb(verbs, "down", cmd_down, help="remove everything the lab made")

    ssh = add_verb(verbs, "ssh", cmd_ssh,
                   help="log in to a node of a node-image lab as root, with the lab's admin key",
                   description="Run ssh inside the lab's namespaces as root@NODE with the admin "
                               "key the lab made (its public half is the lab cluster's "
                               "admin_ssh_keys), checking the node's host key against the one "
                               "the database holds for it. With a COMMAND, run that and exit "
                               "with its code.")
    ssh.add_argument("node", metavar="NODE")
    ssh.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND")

    power = add_verb(verbs, "power-on", cmd_power_on,
                     help="power on a node: a new one, or a lab machine that was killed",
                     description="Start a QEMU machine with NODE's MAC on the lab network "
                                 "(a node left off by --nodes, one added since with `vlx "
                                 "node add`, or a lab machine whose QEMU was killed): "
                                 "whichever nodes' replicas answer boot it.")
    power.add_argument("node", metavar="NODE")

    boot = verbs.add_parser("bootstrap", help="the bootstrap of a node-image lab")
    boot_verbs = boot.add_subparsers(dest="bootstrap_verb", metavar="VERB", required=True)
    remove = boot_verbs.add_parser("remove", help="stop the bootstrap replica and remove its "
                                                  "etcd member: the nodes serve each other")
    remove.set_defaults(handler=cmd_bootstrap_remove)


def _cluster_to_boot(args: argparse.Namespace) -> tuple[Cluster, str]:
    """The cluster the lab boots, checked in memory before anything is made."""
    if args.inventory is not None:
        source = str(args.inventory)
        return inventory.apply(Cluster(generation=0, settings=None),
                               inventory.load(args.inventory), source), source
    db = Database(args.db, store=args.store)
    if not db.exists():
        raise VlxError(f"no database at {db.name}: name the cluster with --inventory FILE",
                       "--inventory")
    return db.load(), db.name


def cmd_up(args: argparse.Namespace) -> int:
    # Imported here: building images and rendering trees is only for `up`.
    from virtualinux.bootsvc.service import service_class
    from virtualinux.image.tiny import build_tiny
    from virtualinux.netboot import render

    if args.timeout <= 0:
        raise VlxError("must be more than 0 seconds", "--timeout")
    cluster, source = _cluster_to_boot(args)
    state_dir = args.state_dir.absolute()
    if args.image == "node" and args.image_dir is not None:
        raise VlxError("boots the tiny image: give it with --image tiny", "--image-dir")
    if (args.image or ("tiny" if args.image_dir else "node")) == "node":
        return _up_node_image(args, cluster, state_dir)
    layout = plan.plan(cluster, state_dir, args.nodes, args.replicas, args.firmware)
    lab.preflight(layout)
    services = lab.REPLICA_SERVICES
    for name in services:
        service_class(name)   # a service not built yet fails here, before anything is made
    kernel_args = (*LAB_KERNEL_ARGS, *args.kernel_arg)
    image_dir = args.image_dir
    if image_dir is None:
        print("building the tiny lab image (cached after the first time) ...", flush=True)
        image_dir = build_tiny()
    render.boot_image(image_dir)   # vmlinuz and initrd.img are there

    def fill(db: Database) -> Cluster:
        return db.update("lab up", f"import {source}",
                         lambda old: _copy_of(cluster, old))

    def render_tree(fresh: Cluster, out: Path) -> None:
        render.render(fresh, image_dir, out, kernel_args)

    print(f"lab {layout.prefix}: {len(layout.nodes)} node(s), {len(layout.replicas)} replicas "
          f"({', '.join(str(r.address) for r in layout.replicas)}), {layout.firmware}, "
          f"state in {state_dir}", flush=True)
    running = lab.start(layout, fill, render_tree, services)
    if args.no_wait:
        print(f"nodes powered on; `{_hint(args, 'status')}` follows them")
        return 0
    return _follow(args, running, [p.node.name for p in layout.nodes], "ready")


def _up_node_image(args: argparse.Namespace, cluster: Cluster, state_dir: Path) -> int:
    from virtualinux.image.build import build_image, image_spec

    layout = plan.plan(cluster, state_dir, args.nodes, firmware=args.firmware, image="node")
    lab.preflight(layout)
    print("building the node image (cached after the first time) ...", flush=True)
    image_dir = build_image(image_spec("node"), progress=lambda line: print(line, flush=True))
    print(f"lab {layout.prefix}: {len(layout.nodes)} node(s) booting the node image over "
          f"iSCSI, bootstrap {layout.replicas[0].address}, SAN {layout.san}, "
          f"{layout.firmware}, state in {state_dir}", flush=True)
    running = selfhost.start(layout, cluster, image_dir,
                             (*LAB_KERNEL_ARGS, *args.kernel_arg), say=print)
    if args.no_wait:
        print(f"nodes powered on; `{_hint(args, 'status')}` follows them")
        return 0
    return _follow(args, running, [p.node.name for p in layout.nodes], "serving")


def _follow(args: argparse.Namespace, running, names: list[str], until: str) -> int:
    """Show the nodes' progress until all reach `until`; then the lab's status."""
    state_dir = args.state_dir.absolute()
    display = ProgressDisplay(names, sys.stdout)
    try:
        watcher = running.wait(args.timeout, until, display.show)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the lab stays up (`{_hint(args, 'down')}` removes it)")
        return 130
    display.finish()
    print()
    _print_status(lab.status(state_dir))
    late = [node.name for node in watcher.nodes.values() if node.phase != until]
    if late:
        print(f"\nnot ready after {args.timeout:g} s: {', '.join(late)}; the lab stays up for "
              f"a look (`{_hint(args, 'console NODE')}`), `{_hint(args, 'down')}` removes it",
              file=sys.stderr)
        return 1
    print(f"\nthe lab is up: `{_hint(args, 'console ' + names[0])}`, "
          f"`{_hint(args, 'status')}`, `{_hint(args, 'down')}`")
    return 0


def _hint(args: argparse.Namespace, verb: str) -> str:
    """A `vlx lab VERB` command line that works as printed: the program as this shell finds
    it (bare `vlx` when that is the one on PATH), and the state directory if not the default."""
    program = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "vlx" else "vlx"
    on_path = shutil.which("vlx")
    if on_path and os.path.realpath(on_path) == os.path.realpath(program):
        program = "vlx"
    default = Path(os.environ.get("VLX_LAB_DIR") or plan.DEFAULT_STATE_DIR)
    where = "" if args.state_dir == default else f" --state-dir {args.state_dir}"
    return f"{program} lab {verb}{where}"


def _copy_of(cluster: Cluster, old: Cluster) -> Cluster:
    return dataclasses.replace(cluster, generation=old.generation)


class ProgressDisplay:
    """One line per node; redrawn in place on a terminal, a line per change otherwise."""

    def __init__(self, names: list[str], out) -> None:
        self.names = names
        self.out = out
        self.tty = out.isatty()
        self.rows = {name: "off" for name in names}
        self.phases: dict[str, tuple[str, ...]] = {}
        self.times = {name: 0.0 for name in names}
        self.width = max(map(len, names))
        if self.tty:
            self._draw(first=True)

    def show(self, node: NodeProgress, phase: str, elapsed: float) -> None:
        # A node that came up on the wrong address says so instead of "init".
        shown = node.describe() if phase == node.phase else phase
        self.rows[node.name] = shown
        self.phases[node.name] = node.phases
        self.times[node.name] = elapsed
        if self.tty:
            self._draw()
        else:
            print(f"{elapsed:7.1f}s  {node.name:<{self.width}}  {shown}", file=self.out,
                  flush=True)

    def _draw(self, first: bool = False) -> None:
        if not first:
            self.out.write(f"\x1b[{len(self.names)}A")
        for name in self.names:
            steps = self.phases.get(name, ("off",))[1:]
            phase = self.rows[name]
            word = phase.split()[0]
            # A phase with more words (came up on the wrong address, a step that FAILED) is
            # shown as far as its first word.
            done = steps.index(word) + 1 if word in steps else 0
            bar = "#" * done + "." * (len(steps) - done)
            self.out.write(f"\x1b[2K  {name:<{self.width}}  [{bar}]  {phase:<16} "
                           f"{self.times[name]:6.1f}s\n")
        self.out.flush()

    def finish(self) -> None:
        self.out.flush()


def _print_status(report: dict) -> None:
    rows = []
    for node in report["nodes"]:
        # The tiny image's nodes are up at init, the node image's when their replica serves.
        after = node["seen"].get("serving", node["seen"].get("init"))
        booted = f"{after:.1f}" if after is not None else "-"
        rows.append((node["name"], node["mac"], node["ip"], node["phase"], booted,
                     node["qemu_pid"] or "-"))
    print_table(("NODE", "MAC", "ADDRESS", "PHASE", "UP AFTER (s)", "QEMU PID"), rows)
    print()
    replicas = []
    for replica in report["replicas"]:
        counters = replica["counters"]
        acks = counters.get("dhcp", {}).get("DHCPACK", 0)
        replicas.append((replica["name"], replica["address"], replica["state"],
                         replica.get("answers", "-"), replica["pid"] or "-",
                         replica["generation"], acks, replica["log"] or "-"))
    print_table(("REPLICA", "ADDRESS", "STATE", "ANSWERS", "PID", "GEN", "DHCPACKS", "LOG"),
                replicas)
    if report.get("members") is not None:
        print()
        print_table(("DB MEMBER", "PEER URL", "CLIENT URL", "HEALTHY"),
                    [(m["name"] or "(not started)", m["peer_url"], m["client_url"] or "-",
                      m["healthy"]) for m in report["members"]])


def cmd_status(args: argparse.Namespace) -> int:
    report = lab.status(args.state_dir.absolute())
    if args.json:
        print_json(report)
    else:
        print(f"lab {report['prefix']} ({report['phase']}, {report['firmware']}) in "
              f"{report['state_dir']}\n")
        _print_status(report)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    report = lab.status(args.state_dir.absolute())
    node = next((n for n in report["nodes"] if n["name"] == args.node), None)
    if node is None:
        names = ", ".join(n["name"] for n in report["nodes"])
        raise VlxError(f"no node {args.node!r} in this lab (it has {names})", "NODE")
    log = Path(node["serial_log"])
    if args.attach:
        if node["qemu_pid"] is None:
            raise VlxError(f"{args.node} is not running: nothing to attach to", "NODE")
        print(f"attached to {args.node}'s serial port; Ctrl-] detaches", file=sys.stderr)
        console.attach(log.with_name("serial.sock"))
        return 0
    if not log.exists():
        raise VlxError(f"{args.node} has written nothing yet ({log})", "NODE")
    if args.no_follow:
        console.follow(log, sys.stdout.buffer, stop=lambda: True)
        return 0
    qemu_pid = node["qemu_pid"]
    console.follow(log, sys.stdout.buffer,
                   stop=lambda: qemu_pid is None or not pid_alive(qemu_pid))
    return 0


def cmd_bootstrap_remove(args: argparse.Namespace) -> int:
    for line in selfhost.remove_bootstrap(args.state_dir.absolute()):
        print(line)
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    return admin.ssh(args.state_dir.absolute(), args.node, args.command)


def cmd_power_on(args: argparse.Namespace) -> int:
    print(admin.power_on(args.state_dir.absolute(), args.node))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    started = time.monotonic()
    removed = lab.down(args.state_dir.absolute())
    if not removed:
        print(f"no lab in {args.state_dir}: nothing to remove")
        return 0
    for item in removed:
        print(f"removed {item}")
    print(f"the lab is down ({time.monotonic() - started:.1f} s)")
    return 0
