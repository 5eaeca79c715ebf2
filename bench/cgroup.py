"""CPU caps for the benches' servers: a fresh cgroup per server run, with a CPU quota.

    with CpuCaps(find_cpu_hierarchy(), cap=0.25) as caps:
        with caps.capped(server_pid) as run:
            ...                       # the server gets at most 0.25 of a CPU meanwhile
            run.throttled()           # periods in which it hit the quota

Why: with a whole CPU each, a fast server is limited by its client (perfdhcp on the other CPU
tops out near 11,000 DORA/s here), so the table shows the client, not the server. With every
server held to the same fraction of a CPU, the server is the limit again, like for like.

Either hierarchy is taken, whichever has the cpu controller at run time: cgroup v1
(`cpu.cfs_quota_us`, `cpu.cfs_period_us`) or cgroup v2 (`cpu.max`); with neither,
`CgroupError` says so. All cgroups live under one parent the bench owns (`vlx-bench-PID`
under the hierarchy's root); each server run gets its own child, which is removed afterwards,
also when the run fails: its processes go back to the root first. The server's whole thread
group is moved (`cgroup.procs`, not `tasks`), and every thread it has is checked to be in, so
the quota holds for all of them (threads made later inherit it).

The file system is reached through `Kernel` (read, write, mkdir, rmdir), so the tests can run
the same logic against a temporary directory. Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path

MOUNTS = Path("/proc/self/mounts")
PROC = Path("/proc")
# The kernel's bounds: a quota of at least 1 ms, a period of at least 1 ms.
MIN_QUOTA_US = 1_000
MIN_PERIOD_US = 1_000


class CgroupError(RuntimeError):
    """No usable cpu controller, or a cgroup that cannot be made, filled or removed."""


class Kernel:
    """The cgroup file system as the kernel offers it; tests stand a directory in for it."""

    def read(self, path: Path) -> str:
        return path.read_text()

    def write(self, path: Path, text: str) -> None:
        # One write() per value: the kernel takes a cgroup file's value per write call.
        with path.open("w") as file:
            file.write(text)

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()      # a cgroup's files go with it; the kernel refuses while it has tasks


@dataclasses.dataclass(frozen=True)
class CpuHierarchy:
    """Where the cpu controller is mounted, and which cgroup version it is (1 or 2)."""

    root: Path
    version: int

    def quota_files(self, quota_us: int, period_us: int) -> list[tuple[str, str]]:
        """(file, value) to write, in order, for `quota_us` of CPU per `period_us`."""
        if self.version == 1:   # the period first: a quota above the old period is refused
            return [("cpu.cfs_period_us", str(period_us)), ("cpu.cfs_quota_us", str(quota_us))]
        return [("cpu.max", f"{quota_us} {period_us}")]

    @property
    def threads_file(self) -> str:
        """The file that lists every thread in a cgroup."""
        return "tasks" if self.version == 1 else "cgroup.threads"


def find_cpu_hierarchy(mounts: Path = MOUNTS, kernel: Kernel | None = None) -> CpuHierarchy:
    """The mounted hierarchy with the cpu controller: a cgroup v1 mount with the `cpu` option
    (alone or with others, e.g. `cpu,cpuacct`), else a cgroup2 mount listing `cpu` in its
    cgroup.controllers; `CgroupError` if there is none."""
    kernel = kernel or Kernel()
    v2_without_cpu = []
    for line in kernel.read(mounts).splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, options = Path(_unescape(fields[1])), fields[2], fields[3].split(",")
        if fstype == "cgroup" and "cpu" in options:
            return CpuHierarchy(where, 1)
        if fstype == "cgroup2":
            try:
                controllers = kernel.read(where / "cgroup.controllers").split()
            except OSError:
                controllers = []
            if "cpu" in controllers:
                return CpuHierarchy(where, 2)
            v2_without_cpu.append(str(where))
    seen = (f"; cgroup2 at {', '.join(v2_without_cpu)} has no cpu controller"
            if v2_without_cpu else "")
    raise CgroupError(f"no cgroup hierarchy with the cpu controller is mounted (looked for "
                      f"a cgroup v1 mount with option cpu, or cgroup2 with cpu in "
                      f"cgroup.controllers){seen}: --cpu-cap needs one")


def _unescape(field: str) -> str:
    """A path from /proc/self/mounts, where space, tab, newline and \\ are octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def period_for(cap: float) -> int:
    """The shortest period the kernel allows for `cap` (one whose quota is 1 ms or more).
    Short, because a capped server is held still for (1 - cap) of each period: in a long
    pause (75 ms of the kernel's default 100 ms at 0.25) requests pile up past a default
    receive buffer (~166 DHCP datagrams) at a few thousand a second, however fast the server
    then is; with short ones the cap is closer to a slower CPU."""
    if not cap > 0:
        raise ValueError(f"a CPU cap must be above 0, not {cap}")
    return max(MIN_PERIOD_US, math.ceil(MIN_QUOTA_US / cap))


def quota_us(cap: float, period_us: int) -> int:
    """CPU microseconds per period for `cap` of one CPU (0 < cap <= number of CPUs)."""
    if not cap > 0:
        raise ValueError(f"a CPU cap must be above 0, not {cap}")
    quota = round(cap * period_us)
    if quota < MIN_QUOTA_US:
        raise ValueError(f"a cap of {cap} CPU is {quota} us per {period_us} us period; the "
                         f"kernel takes at least {MIN_QUOTA_US} us")
    return quota


class CappedRun:
    """One server run's cgroup: its path, and how often the server hit the quota."""

    def __init__(self, caps: CpuCaps, path: Path):
        self.caps = caps
        self.path = path

    def throttled(self) -> tuple[int, int]:
        """(periods, periods in which the quota ran out) since the cgroup was made."""
        stat = dict(line.split()[:2] for line in
                    self.caps.kernel.read(self.path / "cpu.stat").splitlines() if line.strip())
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))


class CpuCaps:
    """A bench-owned parent cgroup under which each server run gets a fresh child held to
    `cap` of a CPU (per `period_us`, by default `period_for(cap)`). A context manager: the
    parent is removed at the end (and any child left behind, with its processes moved back
    to the root)."""

    def __init__(self, hierarchy: CpuHierarchy, cap: float, period_us: int | None = None,
                 kernel: Kernel | None = None, proc: Path = PROC, name: str | None = None):
        self.hierarchy = hierarchy
        self.cap = cap
        self.period_us = period_us or period_for(cap)
        self.quota_us = quota_us(cap, self.period_us)
        self.kernel = kernel or Kernel()
        self.proc = proc
        self.parent = hierarchy.root / (name or f"vlx-bench-{os.getpid()}")
        self._runs = itertools.count(1)
        self._made = False

    def __enter__(self) -> CpuCaps:
        root = self.hierarchy.root
        if self.hierarchy.version == 2:
            # A child has cpu.max only if every cgroup above it delegates the controller.
            self._write(root / "cgroup.subtree_control", "+cpu")
        self._mkdir(self.parent)
        self._made = True
        try:
            if self.hierarchy.version == 2:
                self._write(self.parent / "cgroup.subtree_control", "+cpu")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._made:
            return
        for child in sorted(p for p in _subdirs(self.parent)):
            self._remove(child)
        self._remove(self.parent)
        self._made = False

    @contextlib.contextmanager
    def capped(self, pid: int) -> Iterator[CappedRun]:
        """`pid` (all its threads) in a fresh cgroup held to the cap for the block; the
        cgroup is removed afterwards, whatever happens."""
        if not self._made:
            raise CgroupError("CpuCaps.capped outside its `with` block")
        path = self.parent / f"run-{next(self._runs)}"
        self._mkdir(path)
        try:
            for name, value in self.hierarchy.quota_files(self.quota_us, self.period_us):
                self._write(path / name, value)
            self._write(path / "cgroup.procs", str(pid))
            self._check_threads(pid, path)
            yield CappedRun(self, path)
        finally:
            self._remove(path)

    def _check_threads(self, pid: int, path: Path) -> None:
        """Every thread of `pid` is in `path` (the quota counts them all)."""
        inside = set(self.kernel.read(path / self.hierarchy.threads_file).split())
        try:
            threads = {task.name for task in (self.proc / str(pid) / "task").iterdir()}
        except OSError as err:
            raise CgroupError(f"pid {pid} is gone: {err}") from err
        missing = threads - inside
        if missing:
            raise CgroupError(f"threads {sorted(missing, key=int)} of pid {pid} are not in "
                              f"{path} after moving the process: the cap would miss them")

    def _remove(self, path: Path) -> None:
        """Move what is still in `path` back to the root (a process that outlived the run),
        then remove the cgroup."""
        try:
            left = self.kernel.read(path / "cgroup.procs").split()
        except FileNotFoundError:
            return      # never made, or gone already
        except OSError as err:
            raise CgroupError(f"cannot read {path / 'cgroup.procs'}: {err}") from err
        for pid in left:
            try:
                self._write(self.hierarchy.root / "cgroup.procs", pid)
            except CgroupError:
                pass    # it ended meanwhile
        try:
            self.kernel.rmdir(path)
        except OSError as err:
            raise CgroupError(f"cannot remove cgroup {path}: {err}") from err

    def _mkdir(self, path: Path) -> None:
        try:
            self.kernel.mkdir(path)
        except OSError as err:
            raise CgroupError(f"cannot make cgroup {path}: {err}") from err

    def _write(self, path: Path, value: str) -> None:
        try:
            self.kernel.write(path, value)
        except OSError as err:
            raise CgroupError(f"cannot write {value!r} to {path}: {err}") from err


def _subdirs(path: Path) -> list[Path]:
    try:
        return [child for child in path.iterdir() if child.is_dir()]
    except FileNotFoundError:
        return []


def describe(cap: float | None) -> str:
    """How a row's CPU is labelled in the tables."""
    return "whole CPU" if cap is None else f"CPU-capped at {cap:g} of a CPU"
