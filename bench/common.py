"""What every bench shares: how ours is started, CPU pinning, repeats and their statistics, the
machine's load, and the table written as Markdown and JSON.

A bench makes a `Report` first (it notes the load before), adds one row per measurement with
`Stat`s (median, min, max of the repeats), and ends with `report.finish(args.json)`: the load
after, the Markdown table on stdout, and the same rows as JSON when `--json FILE` is given.
Peers run interleaved with ours (`interleaved`), so a slow minute of a shared machine falls on
every server alike. Imports only the boot services' command line (`start_ours`) and the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from virtualinux.vvcm import Cluster, Settings
from virtualinux.vvcm.command import vlx_command

# Left alone, the scheduler sometimes puts a lock-step server on the client's CPU and sometimes
# not, and that alone changes a row 3x here. So servers get CPU 1 and clients CPU 0, like a
# server and its clients on different machines: every packet wakes the other side.
SERVER_CPU, CLIENT_CPU = "1", "0"
PIN = (os.cpu_count() or 1) > 1       # --no-pin: leave placement to the scheduler


def pinned(cpu: str, cmd: Sequence[str]) -> list[str]:
    return (["taskset", "-c", cpu] if PIN else []) + list(cmd)


def run(main: Callable[[], int]) -> int:
    """Run a bench's `main` so that a SIGTERM (kill, timeout) ends it like ^C: its `finally`s
    and context managers remove the namespaces and servers it made. Only in this process: a
    child forked from it (pyroute2 forks one per namespace socket and terminates it) must not
    unwind through those `finally`s, or it takes the run's namespaces down under it."""
    main_pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    return main()


def add_flags(parser: argparse.ArgumentParser, repeat: int = 3) -> None:
    """The flags every bench has: --repeat, --json FILE, --no-pin."""
    parser.add_argument("--repeat", type=int, default=repeat,
                        help=f"runs per row and server (default: {repeat})")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the table as JSON to FILE")
    parser.add_argument("--no-pin", action="store_true",
                        help=f"do not pin servers to CPU {SERVER_CPU} and clients to CPU "
                             f"{CLIENT_CPU}")


def apply_flags(args: argparse.Namespace) -> None:
    global PIN
    PIN = PIN and not args.no_pin
    if args.repeat < 1:
        raise SystemExit("--repeat: at least 1")


# How ours is started, in one place: every bench calls this.
def ours_command(db: Path, root: Path, address: str, services: Sequence[str],
                 interface: str = "eth0", state_dir: Path | None = None,
                 settings: Mapping[str, object] | None = None,
                 quiet: bool = True) -> list[str]:
    """Our services as production runs them, `vlx bootsvc run`, in the foreground: it prints
    `ready ...` once they listen and keeps its counters in STATE_DIR's status file (a fresh
    temporary directory when `state_dir` is None). `settings`: SERVICE.FIELD -> value, the
    typed `--set` options (e.g. `dhcp.receive_buffer`). `quiet`: problems only, no line per
    answer (`--quiet`, like the peers with their per-packet logs off)."""
    state = state_dir or Path(tempfile.mkdtemp(prefix="bench-ours-"))
    args = ["--db", str(db), "bootsvc", "run", "--netboot-root", str(root),
            "--address", address, "--interface", interface, "--state-dir", str(state),
            "--services", ",".join(services)]
    for key, value in (settings or {}).items():
        args += ["--set", f"{key}={value}"]
    if quiet:
        args.append("--quiet")
    return vlx_command(*args)


def start_ours(namespace, cmd_args: dict[str, Any], log: Path | None = None,
               cpu: str = SERVER_CPU, env: Mapping[str, str] | None = None
               ) -> subprocess.Popen:
    """Start `ours_command(**cmd_args)` pinned in `namespace`; return once it listens. `env`:
    the whole environment (e.g. a PYTHONPATH from `baseline_path`)."""
    process = namespace.popen(pinned(cpu, ours_command(**cmd_args)), stdout=subprocess.PIPE,
                              stderr=log.open("w") if log else subprocess.DEVNULL, text=True,
                              env=env)
    line = process.stdout.readline()
    if not line.startswith("ready"):
        stop(process)
        detail = log.read_text()[-2000:] if log else ""
        raise RuntimeError(f"our services did not start: {line!r}\n{detail}")
    return process


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and of its live descendants (nginx's workers are its children); 0 for
    a process that is gone."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += cpu_seconds(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += map(int, (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


# The checkout the benches run from: --baseline takes older revisions of ours from it.
REPO = Path(__file__).resolve().parent.parent


def baseline_path(revision: str, work: Path) -> Path:
    """A PYTHONPATH entry that imports `virtualinux` from git revision `revision` of this
    checkout: its tree unpacked under `work`, with a `virtualinux/` of symlinks laid out as
    its pyproject's package-dir says (the layout an install would make)."""
    source = work / "baseline-src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    package_dir = tomllib.loads((source / "pyproject.toml").read_text())["tool"][
        "setuptools"]["package-dir"]
    path = work / "baseline-path"
    for package, folder in package_dir.items():
        link = path.joinpath(*package.split("."))
        if not link.parent.exists():
            link.parent.mkdir(parents=True)
        if not link.exists():
            link.symlink_to(source / folder)
    return path


def baseline_env(revision: str, work: Path) -> dict[str, str]:
    """The environment that makes `vlx` run our server as it was at git revision `revision`
    (`--baseline`), to run interleaved with the current one."""
    return dict(os.environ, PYTHONPATH=str(baseline_path(revision, work)))


def settings_of(cluster: Cluster) -> Settings:
    """The settings of a bench's own database, which always has them."""
    if cluster.settings is None:
        raise RuntimeError("the bench database has no [cluster] settings")
    return cluster.settings


def stop(process: subprocess.Popen, timeout: float = 10) -> str:
    """SIGTERM, then SIGKILL; what it still printed on stdout (ours: its counters)."""
    if process.poll() is None:
        process.terminate()
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out or ""


def load() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclasses.dataclass(frozen=True)
class Stat:
    """Median, min and max of a row's repeats."""

    median: float
    low: float
    high: float
    runs: int
    digits: int = 1     # shown after the point

    @classmethod
    def of(cls, values: Sequence[float], digits: int = 1) -> Stat:
        if not values:
            raise ValueError("no runs to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values), digits)

    def show(self, digits: int | None = None) -> str:
        digits = self.digits if digits is None else digits
        if self.runs == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"

    def as_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "runs": self.runs}


def interleaved(repeat: int, runs: Mapping[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Each run of every server, round by round: A B C, A B C, ..."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            results[name].append(run())
    return results


def markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "| --- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(cell: object) -> str:
    if isinstance(cell, Stat):
        return cell.show()
    if cell is None:
        return "-"
    return str(cell)


def _json_cell(cell: object) -> object:
    if isinstance(cell, Stat):
        return cell.as_json()
    return cell


class Report:
    """One bench's table(s): the load before and after, the command, the date."""

    def __init__(self, bench: str, argv: Sequence[str] | None = None):
        self.bench = bench
        self.command = "python -m virtualinux.bench." + bench + (
            " " + shlex.join(argv) if argv else "")
        self.date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.load_before = load()
        self.load_after: tuple[float, float, float] | None = None
        self.tables: list[dict[str, Any]] = []
        self.notes: list[str] = []
        print(f"{self.command}\nload average before: {_load(self.load_before)}", flush=True)

    def table(self, title: str, headers: Sequence[str],
              rows: Sequence[Sequence[object]]) -> None:
        self.tables.append({"title": title, "headers": list(headers),
                            "rows": [list(row) for row in rows]})

    def note(self, line: str) -> None:
        self.notes.append(line)

    def as_json(self) -> dict[str, Any]:
        return {"bench": self.bench, "command": self.command, "date": self.date,
                "load_before": self.load_before, "load_after": self.load_after,
                "pinned": PIN, "cpus": os.cpu_count(),
                "tables": [{"title": t["title"], "headers": t["headers"],
                            "rows": [[_json_cell(c) for c in row] for row in t["rows"]]}
                           for t in self.tables],
                "notes": self.notes}

    def markdown(self) -> str:
        parts = [f"{self.date}, `{self.command}`, load average before "
                 f"{_load(self.load_before)}, after {_load(self.load_after or load())}, "
                 f"{'pinned' if PIN else 'not pinned'}; cells: median (min-max)"]
        for table in self.tables:
            parts += [f"**{table['title']}**", markdown(table["headers"], table["rows"])]
        parts += self.notes
        return "\n\n".join(parts)

    def finish(self, json_path: Path | None = None) -> None:
        self.load_after = load()
        print()
        print(self.markdown(), flush=True)
        if json_path is not None:
            json_path.write_text(json.dumps(self.as_json(), indent=2) + "\n")


def _load(values: tuple[float, float, float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "-"
