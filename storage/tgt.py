"""iSCSI export with tgt: a private `tgtd` per portal, and making its targets match the database.

Each exported volume is one target (`naming.target_iqn`), its disk on LUN 1 (LUN 0 is tgt's
controller), bound to one initiator name (`naming.initiator_iqn` of the volume's owner: a node
may attach only its own volumes) and to the owner's CHAP account (secret in the database).
The database is the truth; `sync` makes a running tgtd match it, so a restarted tgtd gets every
export back. We run tgtd with its own control port (`-C N`) and remember it in a state file
(pid, port, portal), so we never touch another tgtd, and every `vlx` process finds ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.host import NETNS_DIR, in_netns, pid_alive
from virtualinux.vvcm.model import Cluster, Volume

from .backend import backend_for
from .naming import initiator_iqn

log = logging.getLogger("virtualinux.storage.tgt")

DEFAULT_STATE_DIR = Path("/run/virtualinux/storage")
TGT_SOCKET_DIR = Path("/var/run/tgtd")
DISK_LUN = 1
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
PARALLEL_TGTADM = 4
WATCH_INTERVAL = 1.0


class TgtDown(VlxError):
    """The tgtd serving a portal is not running (it died, or was never started)."""


class PortalNotBound(VlxError):
    """tgtd does not listen on exactly its portal. When it cannot bind the portal's address
    (the address is not on this host), tgtd falls back to every address (0.0.0.0 and [::]),
    which would offer every node's root volume on every interface."""


class ExportsFailed(VlxError):
    """Some exports could not be made; every other one is served (one bad volume must not keep
    a whole cluster from booting)."""


def state_dir() -> Path:
    return Path(os.environ.get("VLX_STORAGE_STATE") or DEFAULT_STATE_DIR)


def default_control_port(portal: str) -> int:
    """A control port derived from the portal, away from tgtd's default 0 (a system tgtd)."""
    return 20000 + zlib.crc32(portal.encode()) % 12000  # tgtd takes at most 32767


@dataclasses.dataclass(frozen=True)
class Export:
    """One target as the database wants it."""

    iqn: str
    path: str
    initiator: str
    username: str
    secret: str


@dataclasses.dataclass(frozen=True)
class Target:
    """One target as tgtd reports it."""

    tid: int
    iqn: str
    backing: str | None
    sessions: int
    acls: tuple[str, ...]
    accounts: tuple[str, ...]


_TARGET = re.compile(r"^Target (\d+): (\S+)$")


def parse_targets(text: str) -> dict[str, Target]:
    """`tgtadm --mode target --op show` -> targets by IQN."""
    targets: dict[str, Target] = {}
    current: dict | None = None
    section = ""

    def close() -> None:
        if current is not None:
            targets[current["iqn"]] = Target(current["tid"], current["iqn"], current["backing"],
                                             current["sessions"], tuple(current["acls"]),
                                             tuple(current["accounts"]))

    lun = None
    for line in text.splitlines():
        match = _TARGET.match(line)
        if match:
            close()
            current = {"tid": int(match[1]), "iqn": match[2], "backing": None, "sessions": 0,
                       "acls": [], "accounts": []}
            continue
        if current is None:
            continue
        stripped = line.strip()
        if line.startswith("    ") and not line.startswith("        "):
            section = stripped.rstrip(":")
            continue
        if section == "I_T nexus information" and stripped.startswith("I_T nexus:"):
            current["sessions"] += 1
        elif section == "LUN information" and stripped.startswith("LUN:"):
            lun = int(stripped.split(":")[1])
        elif (section == "LUN information" and lun == DISK_LUN
              and stripped.startswith("Backing store path:")):
            current["backing"] = stripped.split(":", 1)[1].strip()
        elif section == "ACL information" and stripped:
            current["acls"].append(stripped)
        elif section == "Account information" and stripped:
            current["accounts"].append(stripped)
    close()
    return targets


def parse_accounts(text: str) -> set[str]:
    """`tgtadm --mode account --op show` -> user names."""
    return {line.strip() for line in text.splitlines()[1:] if line.strip()}


class TgtAdmin:
    """tgtadm against one tgtd, found by its control port."""

    def __init__(self, control_port: int):
        self.control_port = control_port

    def run(self, *args: str) -> str:
        cmd = ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            message = result.stderr.strip() or result.stdout.strip()
            if "connect" in message or "not connected" in message:
                raise TgtDown(f"tgtd on control port {self.control_port} is not answering "
                              f"({message}): run `vlx storage serve`")
            raise VlxError(f"tgtadm {' '.join(_redact(args))} failed: {message}")
        return result.stdout

    def ready(self) -> bool:
        try:
            self.run("--mode", "sys", "--op", "show")
        except VlxError:
            return False
        return True

    def targets(self) -> dict[str, Target]:
        return parse_targets(self.run("--mode", "target", "--op", "show"))

    def accounts(self) -> set[str]:
        return parse_accounts(self.run("--mode", "account", "--op", "show"))

    def add_account(self, username: str, secret: str) -> None:
        self.run("--mode", "account", "--op", "new", "--user", username, "--password", secret)

    def add_target(self, tid: int, export: Export) -> None:
        self.run("--mode", "target", "--op", "new", "--tid", str(tid),
                 "--targetname", export.iqn)
        try:
            self.run("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun",
                     str(DISK_LUN), "--backing-store", export.path, "--bstype", "rdwr")
            self.run("--mode", "target", "--op", "bind", "--tid", str(tid),
                     "--initiator-name", export.initiator)
            self.run("--mode", "account", "--op", "bind", "--tid", str(tid),
                     "--user", export.username)
        except VlxError:
            self.delete_target(tid, force=True)
            raise

    def delete_target(self, tid: int, force: bool = False) -> None:
        self.run("--mode", "target", "--op", "delete", "--tid", str(tid),
                 *(["--force"] if force else []))

    def shutdown(self) -> None:
        for target in self.targets().values():
            self.delete_target(target.tid, force=True)
        self.run("--mode", "system", "--op", "delete")


def _redact(args: Sequence[str]) -> list[str]:
    return ["***" if prev == "--password" else arg
            for prev, arg in zip(("",) + tuple(args), args, strict=False)]


def wanted_exports(cluster: Cluster, portal: str) -> dict[str, Export]:
    """The targets the database says `portal` serves, by IQN."""
    if cluster.settings is None:
        return {}
    exports = {}
    for volume in cluster.volumes:
        if volume.portal != portal or not volume.iqn:
            continue
        credential = cluster.credential(volume.owner or "")
        if volume.owner is None or credential is None:
            raise VlxError(f"volume {volume.name} is exported but has no owner with a CHAP "
                           "credential")
        exports[volume.iqn] = Export(
            iqn=volume.iqn, path=backend_for(volume).export_path(volume),
            initiator=initiator_iqn(cluster.settings.name, volume.owner),
            username=credential.username, secret=credential.secret)
    return exports


def sync(admin: TgtAdmin, cluster: Cluster, portal: str, force: bool = False) -> tuple[int, int]:
    """Make tgtd's targets what the database says; returns (added, removed).

    A target that is no longer wanted but still has a session is kept unless `force`
    (a node is using that disk): VlxError, and nothing else changes. A volume that cannot be
    exported (its file is gone, say) does not stop the others: ExportsFailed names it after
    all the rest are served.
    """
    wanted = wanted_exports(cluster, portal)
    current = admin.targets()
    stale = [t for iqn, t in current.items()
             if iqn not in wanted or t.backing != wanted[iqn].path]
    busy = [t.iqn for t in stale if t.sessions and not force]
    if busy:
        raise VlxError(f"target {busy[0]} still has {current[busy[0]].sessions} session(s): "
                       "log the node out first, or --force")
    for target in stale:
        admin.delete_target(target.tid, force=True)
        del current[target.iqn]
    accounts = admin.accounts()
    new_accounts = {e.username: e.secret for e in wanted.values() if e.username not in accounts}
    first_tid = max((t.tid for t in current.values()), default=0) + 1
    failures = [f"{e.iqn}: {e.path} is missing" for iqn, e in wanted.items()
                if iqn not in current and not os.path.exists(e.path)]
    new_targets = [(tid, export) for tid, export in enumerate(
        (e for iqn, e in wanted.items() if iqn not in current and os.path.exists(e.path)),
        start=first_tid)]
    # Each tgtadm call is a process start and one request; a few in flight at once keep
    # tgtd busy while the next process starts (1,000 exports: ~2x faster than one by one).
    with ThreadPoolExecutor(max_workers=PARALLEL_TGTADM) as pool:
        for done in [pool.submit(admin.add_account, user, secret)
                     for user, secret in new_accounts.items()]:
            done.result()
        jobs = [(export, pool.submit(admin.add_target, tid, export))
                for tid, export in new_targets]
        for export, done in jobs:
            try:
                done.result()
            except TgtDown:
                raise
            except VlxError as err:
                failures.append(f"{export.iqn}: {err}")
    if failures:
        raise ExportsFailed(f"{len(failures)} of {len(wanted)} exports on {portal} failed "
                            f"(the others are served): {'; '.join(failures[:5])}"
                            f"{' ...' if len(failures) > 5 else ''}")
    return len(new_targets) - len(failures), len(stale)


# The daemon.

@dataclasses.dataclass(frozen=True)
class Daemon:
    """A tgtd we started: what its state file records."""

    portal: str
    control_port: int
    pid: int
    netns: str | None = None

    @property
    def admin(self) -> TgtAdmin:
        return TgtAdmin(self.control_port)

    def listening(self) -> list[str]:
        return listening_addresses(self.pid)

    def check_bound(self) -> None:
        """PortalNotBound unless tgtd listens on its portal and nowhere else."""
        listening = self.listening()
        if listening != [self.portal]:
            raise PortalNotBound(
                f"tgtd pid {self.pid} listens on {', '.join(listening) or 'nothing'}, not only "
                f"on its portal {self.portal}: stop it (`vlx storage stop --portal "
                f"{self.portal}`)")

    def alive(self) -> bool:
        return pid_alive(self.pid, b"tgtd")


_LISTEN = "0A"


def listening_addresses(pid: int) -> list[str]:
    """The TCP addresses process `pid` listens on ("IP:PORT", "[IPv6]:PORT"), read from its
    own network namespace's /proc/PID/net/tcp{,6} and matched to its sockets by inode."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return []
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != _LISTEN or fields[9] not in inodes:
                continue
            hex_address, hex_port = fields[1].split(":")
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1]
                           for i in range(0, 2 * width, 8))
            address = ipaddress.ip_address(raw)
            shown = f"[{address}]" if address.version == 6 else str(address)
            found.append(f"{shown}:{int(hex_port, 16)}")
    return sorted(found)


def state_file(portal: str, directory: Path | None = None) -> Path:
    return (directory or state_dir()) / f"tgtd-{portal.replace(':', '-')}.json"


def recorded_daemon(portal: str, directory: Path | None = None) -> Daemon | None:
    path = state_file(portal, directory)
    try:
        data = json.loads(path.read_text())
        return Daemon(data["portal"], int(data["control_port"]), int(data["pid"]),
                      data.get("netns"))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise VlxError(f"state file {path} is damaged ({err}): remove it") from None


def recorded_daemons(directory: Path | None = None) -> list[Daemon]:
    root = directory or state_dir()
    daemons = []
    for path in sorted(root.glob("tgtd-*.json")):
        try:
            portal = json.loads(path.read_text())["portal"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise VlxError(f"state file {path} is damaged ({err}): remove it") from None
        daemon = recorded_daemon(portal, root)
        if daemon:
            daemons.append(daemon)
    return daemons


def running_daemon(portal: str, directory: Path | None = None) -> Daemon | None:
    """The live tgtd serving `portal`; None if none was started; TgtDown if it died."""
    daemon = recorded_daemon(portal, directory)
    if daemon is None:
        return None
    if not daemon.alive():
        raise TgtDown(f"tgtd for portal {portal} (pid {daemon.pid}) has died: "
                      "`vlx storage serve` restarts it and restores its exports")
    daemon.check_bound()
    return daemon


def start(portal: str, control_port: int, netns: str | None = None,
          directory: Path | None = None) -> Daemon:
    """Start a private tgtd on `portal` (inside network namespace `netns` if given)."""
    root = directory or state_dir()
    root.mkdir(parents=True, exist_ok=True)
    address, port = portal.rsplit(":", 1)
    cmd = ["tgtd", "-f", "--iscsi", f"portal={address}:{port}", "-C", str(control_port)]
    if netns:
        if not (NETNS_DIR / netns).exists():
            raise VlxError(f"no network namespace {netns!r}")
        cmd = in_netns(netns, cmd)   # tgtd must see pools mounted after it starts
    logfile = root / f"tgtd-{portal.replace(':', '-')}.log"
    with open(logfile, "ab") as out:
        log_start = out.tell()
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(portal, control_port, process.pid, netns)
    deadline = time.monotonic() + READY_TIMEOUT
    while not daemon.admin.ready():
        if process.poll() is not None or time.monotonic() > deadline:
            _kill(process.pid)
            process.wait()
            tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
            raise VlxError(f"tgtd did not start on {portal} (control port {control_port}): "
                           f"{' / '.join(tail) or 'no output'}")
        time.sleep(0.05)
    listening = daemon.listening()
    if listening != [portal]:
        stop(daemon, root)
        with open(logfile, "rb") as out:
            out.seek(log_start)
            lines = out.read().decode(errors="replace").splitlines()
        reason = next((line.split(", ", 1)[-1] for line in lines if "unable to bind" in line),
                      "")
        because = f" ({reason}: is {address} an address of this host?)" if reason else ""
        raise PortalNotBound(f"tgtd could not bind its portal {portal}{because} and listened "
                             f"on {', '.join(listening) or 'nothing'} instead: stopped it; "
                             "nothing is exported")
    state_file(portal, root).write_text(json.dumps(dataclasses.asdict(daemon)))
    log.info("tgtd pid %d serving %s (control port %d)", daemon.pid, portal, control_port)
    return daemon


def stop(daemon: Daemon, directory: Path | None = None) -> None:
    """Stop `daemon`: delete its targets (forcing dead sessions), then tgtd itself."""
    if daemon.alive():
        try:
            daemon.admin.shutdown()
        except VlxError as err:
            log.warning("tgtd pid %d did not shut down cleanly (%s): killing it", daemon.pid,
                        err)
        if not _wait_gone(daemon, STOP_TIMEOUT):
            _kill(daemon.pid)
            _wait_gone(daemon, STOP_TIMEOUT)
    _reap(daemon.pid)
    for leftover in (TGT_SOCKET_DIR / f"socket.{daemon.control_port}",
                     TGT_SOCKET_DIR / f"socket.{daemon.control_port}.lock"):
        leftover.unlink(missing_ok=True)
    state_file(daemon.portal, directory).unlink(missing_ok=True)


def _wait_gone(daemon: Daemon, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while daemon.alive():
        _reap(daemon.pid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status if tgtd is our child (started by this very process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def serve(cluster: Cluster, portal: str, control_port: int, netns: str | None = None,
          directory: Path | None = None) -> tuple[Daemon, int, bool]:
    """Make sure a tgtd serves `portal` with every export the database records for it.

    Returns (daemon, targets added, whether tgtd was (re)started). A recorded tgtd that died
    is replaced and gets all its exports back.
    """
    daemon = recorded_daemon(portal, directory)
    started = False
    if daemon is not None and not daemon.alive():
        log.warning("tgtd for %s (pid %d) had died: restarting it", portal, daemon.pid)
        stop(daemon, directory)
        daemon = None
    if daemon is None:
        daemon = start(portal, control_port, netns, directory)
        started = True
    else:
        daemon.check_bound()
    try:
        added, _ = sync(daemon.admin, cluster, portal)
    except ExportsFailed:
        raise  # tgtd stays up, serving every export that could be made
    except BaseException:
        if started:
            stop(daemon, directory)
        raise
    return daemon, added, started


def sync_if_served(cluster: Cluster, volumes: Sequence[Volume], force: bool = False,
                   directory: Path | None = None) -> list[str]:
    """After a database change: update the running tgtd of every portal these volumes name.
    Returns the portals no tgtd serves (never started, or stopped): their change is only
    recorded, and `serve` makes it when it starts one."""
    unserved = []
    for portal in sorted({v.portal for v in volumes if v.portal}):
        daemon = running_daemon(portal, directory)
        if daemon is None:
            unserved.append(portal)
        else:
            sync(daemon.admin, cluster, portal, force=force)
    return unserved


def watch(daemon: Daemon, load_cluster: Callable[[], Cluster], stopping: Callable[[], bool],
          directory: Path | None = None, interval: float = WATCH_INTERVAL) -> None:
    """Keep `daemon`'s portal served until `stopping()`: a tgtd that dies is restarted with
    every export the database records (read afresh each time). tgtd is stopped at the end."""
    portal, control_port, netns = daemon.portal, daemon.control_port, daemon.netns
    try:
        while not stopping():
            time.sleep(interval)
            if daemon.alive():
                continue
            log.warning("tgtd pid %d died: restarting it with its exports", daemon.pid)
            try:
                daemon, added, _ = serve(load_cluster(), portal, control_port, netns, directory)
            except VlxError as err:  # keep watching: the next round tries again
                log.error("restart failed: %s", err)
                daemon = recorded_daemon(portal, directory) or daemon
                continue
            log.info("tgtd pid %d restored %d targets", daemon.pid, added)
    finally:
        stop(daemon, directory)


@dataclasses.dataclass(frozen=True)
class PortalStatus:
    """One portal as `vlx storage status` shows it: the tgtd recorded for it (if any), and the
    exports the database records for it."""

    portal: str
    state: str                   # "running", "dead", or "no tgtd" (never started, or stopped)
    pid: int | None
    control_port: int | None
    listening: tuple[str, ...]
    exports: int                 # what the database exports on this portal
    targets: int                 # what tgtd serves
    sessions: int
    missing: tuple[str, ...]     # IQNs the database exports and tgtd does not serve


def portal_status(cluster: Cluster, directory: Path | None = None) -> list[PortalStatus]:
    """Every portal that has a recorded tgtd or an export in the database."""
    daemons = {daemon.portal: daemon for daemon in recorded_daemons(directory)}
    portals = sorted(set(daemons) | {v.portal for v in cluster.volumes if v.portal and v.iqn})
    rows = []
    for portal in portals:
        wanted = wanted_exports(cluster, portal)
        daemon = daemons.get(portal)
        running = daemon if daemon is not None and daemon.alive() else None
        targets = running.admin.targets() if running else {}
        rows.append(PortalStatus(
            portal=portal,
            state="running" if running else "dead" if daemon else "no tgtd",
            pid=daemon.pid if daemon else None,
            control_port=daemon.control_port if daemon else None,
            listening=tuple(running.listening()) if running else (),
            exports=len(wanted), targets=len(targets),
            sessions=sum(t.sessions for t in targets.values()),
            missing=tuple(sorted(set(wanted) - set(targets)))))
    return rows
