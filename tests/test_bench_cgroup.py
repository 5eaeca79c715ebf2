"""bench/cgroup.py: the CPU caps of the benches' servers. The fast tests run its logic against
a temporary directory standing for the cgroup file system (`FakeKernel` plays the kernel's
part: interface files, moving a thread group, refusing to remove a busy cgroup); the lab test
holds a real two-thread process to a real quota."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest
from virtualinux.bench import cgroup
from virtualinux.bench.cgroup import CgroupError, CpuCaps, CpuHierarchy, Kernel

THIS_MACHINE_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


class FakeKernel(Kernel):
    """A cgroup file system in a directory: `mkdir` makes a cgroup's interface files, writing
    a pid to cgroup.procs moves all its threads (or only the leader, with `leader_only`),
    membership files are read from that, `rmdir` refuses a cgroup with threads in it."""

    def __init__(self, root: Path, proc: Path, version: int, leader_only: bool = False):
        self.root, self.proc, self.version, self.leader_only = root, proc, version, leader_only
        self.where: dict[str, Path] = {}        # thread id -> its cgroup
        self.writes: list[tuple[Path, str]] = []
        root.mkdir()
        self._files(root)
        if version == 2:
            (root / "cgroup.controllers").write_text("cpu io memory pids\n")

    def add_process(self, pid: int, threads: int) -> None:
        for tid in range(pid, pid + threads):
            (self.proc / str(pid) / "task" / str(tid)).mkdir(parents=True)
            self.where[str(tid)] = self.root

    def _files(self, path: Path) -> None:
        names = ["cgroup.procs", "cpu.stat"]
        names += (["tasks", "cpu.cfs_period_us", "cpu.cfs_quota_us"] if self.version == 1 else
                  ["cgroup.threads", "cgroup.subtree_control"])
        if self.version == 2 and path != self.root and "+cpu" in (
                path.parent / "cgroup.subtree_control").read_text():
            names.append("cpu.max")     # only where the parent delegates cpu
        for name in names:
            (path / name).write_text("nr_periods 7\nnr_throttled 3\n" if name == "cpu.stat"
                                     else "")

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        self._files(path)

    def rmdir(self, path: Path) -> None:
        if any(where == path for where in self.where.values()) or any(
                child.is_dir() for child in path.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        for file in path.iterdir():
            file.unlink()
        path.rmdir()

    def write(self, path: Path, text: str) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file", str(path))
        self.writes.append((path, text))
        if path.name == "cgroup.procs":
            task = self.proc / text / "task"
            if not task.is_dir():
                raise ProcessLookupError(errno.ESRCH, "No such process", text)
            tids = [text] if self.leader_only else [t.name for t in task.iterdir()]
            for tid in tids:
                self.where[tid] = path.parent
            return
        path.write_text(text)

    def read(self, path: Path) -> str:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file", str(path))
        if path.name in ("cgroup.procs", "tasks", "cgroup.threads"):
            tids = sorted(tid for tid, where in self.where.items() if where == path.parent)
            if path.name == "cgroup.procs":     # thread-group leaders only
                tids = [t for t in tids if (self.proc / t).is_dir()]
            return "".join(f"{tid}\n" for tid in tids)
        return super().read(path)


def fake(tmp_path: Path, version: int, **kw) -> tuple[FakeKernel, CpuHierarchy]:
    kernel = FakeKernel(tmp_path / "cgroup", tmp_path / "proc", version, **kw)
    kernel.add_process(4242, threads=3)
    return kernel, CpuHierarchy(kernel.root, version)


def test_this_machines_mounts_give_the_v1_cpu_hierarchy(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(THIS_MACHINE_MOUNTS)
    assert cgroup.find_cpu_hierarchy(mounts) == CpuHierarchy(Path("/sys/fs/cgroup/cpu"), 1)


def test_cgroup2_with_the_cpu_controller_is_taken(tmp_path):
    root = tmp_path / "unified dir"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    mounts = tmp_path / "mounts"
    escaped = str(root).replace(" ", "\\040")
    mounts.write_text(f"cgroup2 {escaped} cgroup2 rw,nosuid 0 0\n")
    assert cgroup.find_cpu_hierarchy(mounts) == CpuHierarchy(root, 2)


def test_co_mounted_cpu_and_cpuacct_count_as_cpu(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n")
    assert cgroup.find_cpu_hierarchy(mounts).version == 1


def test_no_cpu_controller_anywhere_is_a_clear_error(tmp_path):
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("hugetlb\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup /x/cpuacct cgroup rw,cpuacct 0 0\n"
                      f"cgroup2 {root} cgroup2 rw 0 0\n")
    with pytest.raises(CgroupError, match=f"no cgroup hierarchy with the cpu controller.*"
                                          f"{root} has no cpu controller"):
        cgroup.find_cpu_hierarchy(mounts)


def test_the_period_is_the_shortest_with_a_quota_the_kernel_takes():
    assert cgroup.period_for(0.125) == 8_000
    assert cgroup.period_for(0.25) == 4_000
    assert cgroup.period_for(0.3) == 3_334
    assert cgroup.period_for(2) == 1_000
    assert cgroup.quota_us(0.3, cgroup.period_for(0.3)) >= 1_000


def test_quota_is_the_cap_times_the_period():
    assert cgroup.quota_us(0.25, 10_000) == 2_500
    assert cgroup.quota_us(1.5, 100_000) == 150_000
    with pytest.raises(ValueError, match="at least 1000"):
        cgroup.quota_us(0.05, 10_000)
    with pytest.raises(ValueError, match="above 0"):
        cgroup.quota_us(0, 10_000)


def test_v1_run_gets_its_quota_and_all_threads_then_goes(tmp_path):
    kernel, hierarchy = fake(tmp_path, 1)
    with CpuCaps(hierarchy, 0.25, 10_000, kernel=kernel, proc=kernel.proc,
                 name="vlx-bench-t") as caps:
        assert caps.parent == kernel.root / "vlx-bench-t"
        with caps.capped(4242) as run:
            assert run.path == caps.parent / "run-1"
            assert (run.path / "cpu.cfs_period_us").read_text() == "10000"
            assert (run.path / "cpu.cfs_quota_us").read_text() == "2500"
            assert kernel.read(run.path / "tasks").split() == ["4242", "4243", "4244"]
            assert run.throttled() == (7, 3)
        assert not run.path.exists()
        assert kernel.read(kernel.root / "tasks").split() == ["4242", "4243", "4244"]
        with caps.capped(4242) as second:
            assert second.path.name == "run-2"      # a fresh cgroup per run
    assert not caps.parent.exists()
    names = [path.name for path, _ in kernel.writes]
    # The period before the quota: a quota above the old period would be refused.
    assert names.index("cpu.cfs_period_us") < names.index("cpu.cfs_quota_us")


def test_v2_delegates_cpu_down_to_the_run_and_writes_cpu_max(tmp_path):
    kernel, hierarchy = fake(tmp_path, 2)
    with CpuCaps(hierarchy, 0.5, kernel=kernel, proc=kernel.proc, name="b") as caps:
        with caps.capped(4242) as run:
            assert (run.path / "cpu.max").read_text() == "1000 2000"
            assert kernel.read(run.path / "cgroup.threads").split() == ["4242", "4243", "4244"]
        assert (kernel.root / "cgroup.subtree_control").read_text() == "+cpu"
        assert (caps.parent / "cgroup.subtree_control").read_text() == "+cpu"
    assert not caps.parent.exists()


def test_a_failing_run_still_removes_its_cgroup_and_frees_the_process(tmp_path):
    kernel, hierarchy = fake(tmp_path, 1)
    with CpuCaps(hierarchy, 0.25, kernel=kernel, proc=kernel.proc, name="b") as caps:
        with pytest.raises(RuntimeError, match="perfdhcp broke"), caps.capped(4242) as run:
            raise RuntimeError("perfdhcp broke")
        assert not run.path.exists()
        assert kernel.where["4243"] == kernel.root
    assert not caps.parent.exists()


def test_a_gone_process_is_an_error_and_leaves_nothing(tmp_path):
    kernel, hierarchy = fake(tmp_path, 1)
    with CpuCaps(hierarchy, 0.25, kernel=kernel, proc=kernel.proc, name="b") as caps:
        with pytest.raises(CgroupError, match="cannot write '999'"), caps.capped(999):
            pass
        assert not [child for child in caps.parent.iterdir() if child.is_dir()]
    assert not caps.parent.exists()


def test_threads_left_outside_the_cgroup_are_refused(tmp_path):
    """Moving only the leader (as writing to `tasks` would) leaves the other threads
    uncapped: that must fail, not measure a half-capped server."""
    kernel, hierarchy = fake(tmp_path, 1, leader_only=True)
    with CpuCaps(hierarchy, 0.25, kernel=kernel, proc=kernel.proc, name="b") as caps:
        with pytest.raises(CgroupError, match=r"threads \['4243', '4244'\] of pid 4242"), \
                caps.capped(4242):
            pass
        assert not (caps.parent / "run-1").exists()
    assert not caps.parent.exists()


def test_leaving_the_parent_removes_runs_left_behind(tmp_path):
    kernel, hierarchy = fake(tmp_path, 1)
    caps = CpuCaps(hierarchy, 0.25, kernel=kernel, proc=kernel.proc, name="b").__enter__()
    runs = caps.capped(4242)
    runs.__enter__()        # a run never ended (the bench killed mid-run)
    assert kernel.where["4242"] == caps.parent / "run-1"
    caps.close()
    assert not caps.parent.exists()
    assert kernel.where["4242"] == kernel.root
    runs.__exit__(None, None, None)     # the run's own clean-up finds nothing left to do


BUSY_THREADS = """
import threading, time
def spin():
    while True:
        pass
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
print("spinning", flush=True)
time.sleep(60)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.lab
def test_a_real_quota_holds_two_busy_threads_to_the_cap():
    """Two spinning threads would use up to two CPUs; at a cap of 0.2 both together get
    about 0.2 s per second, and nothing is left in the hierarchy afterwards."""
    hierarchy = cgroup.find_cpu_hierarchy()
    process = subprocess.Popen([sys.executable, "-c", BUSY_THREADS], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline() == "spinning\n"
        with CpuCaps(hierarchy, 0.2) as caps:
            with caps.capped(process.pid) as run:
                before = _cpu_seconds(process.pid)
                time.sleep(1.5)
                used = _cpu_seconds(process.pid) - before
                periods, throttled = run.throttled()
            assert not run.path.exists()
        assert not caps.parent.exists()
    finally:
        process.kill()
        process.wait()
    assert used < 0.2 * 1.5 * 1.5, f"{used:.2f} s of CPU in 1.5 s at a cap of 0.2"
    assert used > 0.05
    assert throttled > periods / 2
