"""Diskless boot benchmark: power-on to iSCSI login, root mounted, login prompt and (ours)
"serving" of QEMU nodes booting the real node image, ours against stock parts, in one run.

    python -m virtualinux.bench.diskless [--counts 1,3] [--repeat 1] [--inventory FILE]
        [--image-dir DIR] [--json FILE]

For each node count N (the first N nodes of the inventory, powered on at once) and side, it
makes a lab SAN (vm-test/selfhost.py: a loop-mounted btrfs pool with the node image's root.img
as golden, one reflink snapshot per node, exported by a private tgtd with each node's CHAP
credential), boots the nodes, times each one from QEMU's start, and removes all of it
(namespaces, QEMU, tgtd, daemons, the pool's loop mount), also when a boot fails or on ^C.

    ours    the lab's own path, as `vlx lab up` makes it: the bootstrap (first etcd member and
            our DHCP/TFTP/HTTP/RA replica), our iPXE scripts and per-node cpio, the node image's
            initrd (our iSCSI login from the per-node cpio), then our start-up to "serving"
            (the node's own replica answers HTTP)
    stock   the same golden, snapshots and tgtd; dnsmasq (DHCP + TFTP) and nginx (HTTP) serving
            the same tree layout, radvd sending the same RA as ours (shared/LAB.md "The 13 s iPXE
            wait"); an initrd made by initramfs-tools from the golden itself with only stock
            hooks (open-iscsi's iscsistart login; our hook, login script, node-file copy and
            panic settings left out), told the target the stock way, open-iscsi's
            /etc/iscsi.initramfs in the per-node cpio; our start-up masked on the kernel
            command line (`systemd.mask=` of the virtualinux units), so the stock OS runs to its
            login prompt

Why PXE on both sides, not direct kernel boot: ours is a network boot (that is the product),
and dnsmasq + nginx is the stock way to network-boot the same files, so both pay the same
firmware, iPXE and transfer costs and the rows compare the whole path. The anchor in the issue
(stock parts, direct kernel boot: iSCSI login 6.8 s, login prompt 25.5 s) skips PXE; the
"power-on to kernel" column shows what PXE adds on each side.

Phases, read from each node's serial console (the same lines on both sides):
    kernel   `Linux version` (PXE, iPXE's scripts and the kernel and initrd transfers are done)
    iscsi    the first SCSI device of the session (`scsi H:C:T:L:`): the login succeeded; the
             nodes have no other disk
    root     `EXT4-fs (sdX): mounted filesystem`
    login    the getty's `NAME login:` prompt
    serving  ours only: the node's own replica answers an HTTP GET of boot.ipxe, probed from the
             bootstrap's namespace once the root is mounted

Goals (issue 13): login prompt no slower than stock; 3 nodes at once no slower than 1.3x one
(the last node's time against one node alone); "serving" within 10 s of the login prompt.
Cells: median (min-max) seconds over all nodes and runs; sides interleaved run by run. The
stock initrd is built once per run (~30 s, in a private mount namespace: an overlay on the
golden's read-only loop mount, so nothing is left mounted even if killed) before anything is
timed. Needs root; everything runs in namespaces it makes and removes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from virtualinux.netboot import render
from virtualinux.vm_test import lab as vlab
from virtualinux.vm_test import plan as vplan
from virtualinux.vm_test import selfhost
from virtualinux.vm_test import uplink as vuplink
from virtualinux.vm_test.netns import NETNS_DIR, Namespace
from virtualinux.vm_test.progress import http_from
from virtualinux.vm_test.state import LabRecord
from virtualinux.vvcm import Cluster, Database

from . import common, pxe
from .common import Stat

ROOT = Path(__file__).resolve().parent.parent
INVENTORY = ROOT / "examples" / "lab.toml"
KERNEL_ARGS = ("console=ttyS0",)        # the lab's own (vvcm/cli/lab.py LAB_KERNEL_ARGS)
# The node image's own start-up (image/elements/virtualinux-node, install.d/65-...): masked on
# the stock side. virtualinux-ssh-host-keys (virtualinux-base, in the guest image too) stays:
# it only makes the host keys a stock install would have made when it was installed.
OUR_UNITS = ("virtualinux-startup.service", "virtualinux-bootsvc.service",
             "virtualinux-etcd.service")
STOCK_KERNEL_ARGS = (*KERNEL_ARGS, *(f"systemd.mask={unit}" for unit in OUR_UNITS))
# Our initramfs-tools files in the golden (image/elements/virtualinux-node post-install.d/70-...)
# that the stock initrd is made without; conf.d/virtualinux (zstd, MODULES=most) stays, so
# both initrds carry the same modules with the same compression.
OUR_INITRAMFS_FILES = ("hooks/virtualinux-*", "scripts/*/virtualinux-*", "conf.d/virtualinux-node")
BOOT_TIMEOUT = 1500.0           # three TCG nodes at once on a loaded 2-core machine
POLL = 0.25
PROBE_EVERY = 1.0
PHASES = ("kernel", "iscsi", "root", "login", "serving")
SIDES = ("ours", "stock")
GOAL_LOGIN_RATIO = 1.0
GOAL_SCALING = 1.3
GOAL_SERVING_AFTER_LOGIN = 10.0
# The anchor: stock parts in TCG with direct kernel boot (shared/LAB.md).
ANCHOR = {"iscsi": 6.8, "login": 25.5}

# Console lines, in the order a boot prints them. "\r" is made "\n" before matching.
CONSOLE_LINES = (
    ("kernel", re.compile(r"Linux version ")),
    ("iscsi", re.compile(r"\bscsi \d+:\d+:\d+:\d+: ")),
    ("root", re.compile(r"EXT4-fs \(sd\w+\): mounted filesystem")),
    # A kernel message may follow the prompt on its line ("node1 login: [ 34.6] kvm: ...").
    ("login", re.compile(r"^[\w.-]+ login: ", re.MULTILINE)),
)
# A boot that will not get further: fail at once rather than at the timeout.
# A session whose recovery timed out has lost the root for good (I/O errors, read-only).
FAILURE_LINE = re.compile(r"Kernel panic[^\n]*|virtualinux: iSCSI root [^\n]*|"
                          r"Gave up waiting for root[^\n]*|Rebooting in \d+ seconds[^\n]*|"
                          r"session\d+: session recovery timed out[^\n]*")
OUR_UNIT_LINE = re.compile(r"Starting \S*virtualinux-start")   # not the command line's mask
FAILED_STEP = re.compile(r"virtualinux: \[\d+ ([\w-]+)\] FAILED")

Boot = dict[str, dict[str, float]]      # node -> phase -> seconds after its power-on


class BootFailed(RuntimeError):
    pass


def console_text(data: bytes) -> str:
    return data.decode("utf-8", "replace").replace("\r", "\n")


def console_phases(text: str) -> list[str]:
    """The phases whose console line `text` (a serial log so far) shows, in boot order."""
    return [phase for phase, line in CONSOLE_LINES if line.search(text)]


def console_failure(text: str) -> str | None:
    match = FAILURE_LINE.search(text)
    return match.group(0).strip() if match else None


# --- the stock initrd ------------------------------------------------------------------------

def stock_initrd(image_dir: Path, out: Path) -> Path:
    """initramfs-tools of the golden itself (its kernel, modules, open-iscsi hook), run in a
    chroot of an overlay on its read-only root.img, without our initramfs files. In a private
    mount namespace: every mount (the loop one too, auto-cleared) goes with it."""
    work = Path(tempfile.mkdtemp(prefix="stock-initrd-", dir=out.parent))
    remove = " ".join(f'"$R"/etc/initramfs-tools/{pattern}' for pattern in OUR_INITRAMFS_FILES)
    script = f"""set -eu
W=$1 IMAGE=$2 OUT=$3
mkdir "$W/lower" "$W/rw" "$W/root"
mount -o loop,ro "$IMAGE" "$W/lower"
mount -t tmpfs tmpfs "$W/rw"
mkdir "$W/rw/upper" "$W/rw/work"
mount -t overlay overlay -o "lowerdir=$W/lower,upperdir=$W/rw/upper,workdir=$W/rw/work" "$W/root"
R=$W/root
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/tmp"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
rm -f {remove}
kernel=$(ls "$R/lib/modules" | head -n 1)
chroot "$R" mkinitramfs -o /tmp/initrd.img "$kernel"
cp "$R/tmp/initrd.img" "$OUT"
"""
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script, "stock-initrd", str(work),
                               str(image_dir / "root.img"), str(out)],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"making the stock initrd failed:\n{done.stderr[-2000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def stock_image_dir(image_dir: Path, work: Path) -> Path:
    """A boot image directory (what netboot renders from): the node image's kernel and the
    stock initrd."""
    stock = work / "stock-image"
    stock.mkdir()
    shutil.copy2(image_dir / "vmlinuz", stock / "vmlinuz")
    stock_initrd(image_dir, stock / "initrd.img")
    return stock


# --- one boot --------------------------------------------------------------------------------

def start_stock(layout: vplan.LabPlan, cluster: Cluster, image_dir: Path,
                stock_dir: Path) -> vlab.Lab:
    """The SAN as the lab makes it, then dnsmasq + nginx + radvd where the bootstrap would be,
    serving a tree rendered with the stock initrd; then the nodes."""
    settings = common.settings_of(cluster)
    record = LabRecord(state_dir=layout.state_dir, prefix=layout.prefix, started=time.time(),
                       firmware=layout.firmware, image="node",
                       nodes={p.node.name: {"mac": p.node.mac, "ip": str(p.node.ip),
                                            "tap": p.tap} for p in layout.nodes},
                       replicas={r.name: {"namespace": r.namespace, "address": str(r.address),
                                          "mac": r.mac} for r in layout.replicas})
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    record.save()
    running = vlab.Lab(layout, record)
    try:
        running.make_network()
        san = running._namespace("san")
        running.netns.plug(Namespace(layout.hub), vplan.BRIDGE, san, vplan.REPLICA_INTERFACE,
                           address=f"{layout.san}/{settings.cidr.prefixlen}")
        selfhost.make_san(running, cluster, image_dir)
        fresh = Database(running.paths.database).load()
        render.render(fresh, stock_dir, running.paths.netboot,
                      (*settings.kernel_args, *STOCK_KERNEL_ARGS))
        http_row = next(row for row in pxe.ROWS if row.key == "http-dnsmasq-nginx")
        pxe.start_servers(running, http_row, fresh)
        # The same machines as ours: the gateway nodes' second NIC on the lab's world segment
        # (start_nodes plugs it into the world's bridge).
        vuplink.start_for_nodes(running, cluster)
        running.start_nodes()
    except BaseException:
        vlab.down(layout.state_dir)
        raise
    return running


# Where a node's boot is done: ours serves, and either side shows its login prompt (ours may
# serve before its getty prompts, or after).
LAST = {"ours": ("login", "serving"), "stock": ("login",)}


def finished(side: str, phases: Mapping[str, float]) -> bool:
    return all(phase in phases for phase in LAST[side])


def say(side: str, name: str, phase: str, seconds: float) -> None:
    """Progress as it happens: a run takes long, and an interrupted one still shows it."""
    print(f"  {seconds:7.1f}s  {side:<5} {name}  {phase}", flush=True)


def follow(running: vlab.Lab, side: str, timeout: float = BOOT_TIMEOUT) -> Boot:
    """Poll the nodes' consoles (and, ours, their replicas) until every node is at its last
    phase; seconds after its power-on when each phase was first seen."""
    names = list(running.power_on)
    seen: Boot = {name: {} for name in names}
    answers = http_from(str(NETNS_DIR / running.plan.bootstrap.namespace)) \
        if side == "ours" else None
    probed: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while True:
        for name in names:
            now = time.monotonic()
            on = running.power_on[name]
            log = running.paths.node_dir(name) / "serial.log"
            text = console_text(log.read_bytes()) if log.exists() else ""
            failure = console_failure(text)
            if failure:
                raise BootFailed(f"{side}: {name}: {failure}")
            if side == "stock" and OUR_UNIT_LINE.search(text):
                raise BootFailed(f"stock: {name} started our units: the mask did not hold")
            for phase in console_phases(text):
                if phase not in seen[name]:
                    seen[name][phase] = now - on
                    say(side, name, phase, now - on)
            if (answers is not None and "root" in seen[name] and "serving" not in seen[name]
                    and now - probed.get(name, 0.0) >= PROBE_EVERY):
                probed[name] = now
                if answers(running.record.nodes[name]["ip"]):
                    seen[name]["serving"] = time.monotonic() - on
                    say(side, name, "serving", seen[name]["serving"])
        if all(finished(side, phases) for phases in seen.values()):
            return seen
        if time.monotonic() > deadline:
            where = ", ".join(f"{name} at {furthest(phases)}" for name, phases in seen.items())
            raise BootFailed(f"{side}: not all nodes reached {' and '.join(LAST[side])} in "
                             f"{timeout:g} s ({where})")
        time.sleep(POLL)


def furthest(phases: Mapping[str, float]) -> str:
    return ([phase for phase in PHASES if phase in phases] or ["power-on"])[-1]


def boot_once(cluster: Cluster, count: int, side: str, image_dir: Path, stock_dir: Path,
              state_dir: Path) -> Boot:
    """Power `count` nodes on at once on one side; when each reached each phase."""
    layout = vplan.plan(cluster, state_dir, count, image="node")
    vlab.preflight(layout)
    if side == "ours":
        running = selfhost.start(layout, cluster, image_dir, KERNEL_ARGS, say=lambda line: None)
    else:
        running = start_stock(layout, cluster, image_dir, stock_dir)
    try:
        boot = follow(running, side)
        failed = set()
        for name in boot:
            text = console_text((running.paths.node_dir(name) / "serial.log").read_bytes())
            failed |= {f"{name}: {step}" for step in FAILED_STEP.findall(text)}
        if failed:
            print(f"  (start-up steps FAILED: {', '.join(sorted(failed))})", flush=True)
        return boot
    except BootFailed as err:
        tails = "\n".join(f"--- {name}\n{vlab.tail(running.paths.node_dir(name) / 'serial.log')}"
                          for name in running.power_on)
        raise BootFailed(f"{err}\n{tails}") from None
    finally:
        vlab.down(state_dir)


# --- the tables ------------------------------------------------------------------------------

Results = Mapping[tuple[int, str], Sequence[Boot]]     # (count, side) -> one Boot per run


def times(boots: Sequence[Boot], phase: str) -> list[float]:
    return [phases[phase] for boot in boots for phases in boot.values() if phase in phases]


def last_node(boots: Sequence[Boot], phase: str) -> list[float]:
    """Per run, when the last node reached `phase`."""
    return [max(phases[phase] for phases in boot.values()) for boot in boots
            if boot and all(phase in phases for phases in boot.values())]


def serving_after_login(boots: Sequence[Boot]) -> list[float]:
    return [phases["serving"] - phases["login"] for boot in boots for phases in boot.values()
            if "serving" in phases and "login" in phases]


def stat(values: Sequence[float]) -> Stat | None:
    return Stat.of(values) if values else None


def phase_rows(results: Results, counts: Sequence[int]) -> list[list[object]]:
    rows: list[list[object]] = []
    for count in counts:
        for side in SIDES:
            boots = results.get((count, side), ())
            if not boots:
                continue
            last = "serving" if side == "ours" else "login"
            rows.append([count, side, *(stat(times(boots, phase)) for phase in PHASES),
                         stat(last_node(boots, last)) if count > 1 else None,
                         stat(serving_after_login(boots))])
    return rows


def _ratio(top: Sequence[float], bottom: Sequence[float]) -> float | None:
    if not top or not bottom:
        return None
    return Stat.of(top).median / Stat.of(bottom).median


def goal_rows(results: Results, counts: Sequence[int]) -> list[list[object]]:
    """[goal, nodes, measured, target, met] for each goal the results can answer."""
    rows: list[list[object]] = []

    def add(goal: str, count: int, value: float | None, target: float, unit: str) -> None:
        if value is None:
            return
        rows.append([goal, count, f"{value:.2f}{unit}", f"<= {target:g}{unit}",
                     "yes" if value <= target else "NO"])

    for count in counts:
        ours, stock = results.get((count, "ours"), ()), results.get((count, "stock"), ())
        add("login prompt, ours / stock", count,
            _ratio(times(ours, "login"), times(stock, "login")), GOAL_LOGIN_RATIO, "")
        after = serving_after_login(ours)
        add("serving - login prompt, ours (s)", count,
            Stat.of(after).median if after else None, GOAL_SERVING_AFTER_LOGIN, "")
    one = min(counts)
    for count in counts:
        if count == one:
            continue
        for side, phase in (("ours", "serving"), ("ours", "login"), ("stock", "login")):
            add(f"last {phase} of {count} / {one} alone, {side}", count,
                _ratio(last_node(results.get((count, side), ()), phase),
                       times(results.get((one, side), ()), phase)), GOAL_SCALING, "")
    return rows


def report_tables(report: common.Report, results: Results, counts: Sequence[int]) -> None:
    report.table("Diskless boot: seconds after QEMU starts (PXE, node image over iSCSI, TCG)",
                 ["nodes", "side", "power-on to kernel", "iSCSI login", "root mounted",
                  "login prompt", "serving", "last node done", "serving - login"],
                 phase_rows(results, counts))
    report.table("Goals (issue 13)", ["goal", "nodes", "measured", "target", "met"],
                 goal_rows(results, counts))
    report.note(f"anchor (stock parts, direct kernel boot, no PXE, TCG): iSCSI login "
                f"{ANCHOR['iscsi']} s, login prompt {ANCHOR['login']} s after QEMU starts")
    report.note("'last node done': the last node's serving (ours) or login prompt (stock) in "
                "each run; both sides PXE-boot with the same RA on the segment (ours: ra, "
                "stock: radvd)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.diskless",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,3", help="node counts (default: 1,3)")
    parser.add_argument("--sides", default=",".join(SIDES), help="ours, stock or both")
    parser.add_argument("--inventory", type=Path, default=INVENTORY)
    parser.add_argument("--image-dir", type=Path,
                        help="a built node image (default: build or take the cached one)")
    parser.add_argument("--state-dir", type=Path,
                        default=Path("/run/virtualinux/bench-diskless"))
    common.add_flags(parser, repeat=1)
    args = parser.parse_args(argv)
    common.apply_flags(args)
    common.PIN = False   # the TCG nodes need both CPUs: nothing here is pinned
    if os.geteuid() != 0:
        print("needs root (network namespaces, taps, loop mounts, QEMU)", file=sys.stderr)
        return 2
    try:
        counts = [int(c) for c in args.counts.split(",") if c]
    except ValueError:
        print(f"--counts: not a list of numbers: {args.counts!r}", file=sys.stderr)
        return 2
    sides = [side for side in args.sides.split(",") if side]
    if not counts or any(c < 1 for c in counts) or not sides or set(sides) - set(SIDES):
        print("--counts: positive numbers; --sides: ours, stock", file=sys.stderr)
        return 2
    cluster = pxe.load_cluster(args.inventory)
    if max(counts) > len(cluster.nodes):
        print(f"--counts: the inventory has {len(cluster.nodes)} nodes", file=sys.stderr)
        return 2
    if args.image_dir is None:
        from virtualinux.image.build import build_image, image_spec
        image_dir = build_image(image_spec("node"), progress=lambda line: None)
    else:
        image_dir = args.image_dir
    state_dir = args.state_dir.absolute()
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-diskless-", dir=state_dir.parent))
    try:
        stock_dir = stock_image_dir(image_dir, work) if "stock" in sides else image_dir
        report = common.Report("diskless", argv if argv is not None else sys.argv[1:])
        results: dict[tuple[int, str], list[Boot]] = {}
        try:
            for run in range(args.repeat):
                for count in counts:
                    for side in sides:   # interleaved: a slow minute of the host hits both
                        boot = boot_once(cluster, count, side, image_dir, stock_dir, state_dir)
                        results.setdefault((count, side), []).append(boot)
                        print(f"run {run + 1}: {count} node(s), {side}: " + "; ".join(
                            f"{name} " + " ".join(f"{phase} {phases[phase]:.1f}"
                                                  for phase in PHASES if phase in phases)
                            for name, phases in boot.items()), flush=True)
        except (KeyboardInterrupt, SystemExit):
            # Hours of TCG boots are not thrown away: the tables of the boots that finished.
            if results:
                report.note("INTERRUPTED: only the boots that finished are in the tables")
                report_tables(report, results, counts)
                report.finish(args.json)
            raise
        report_tables(report, results, counts)
        report.finish(args.json)
    except BootFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
