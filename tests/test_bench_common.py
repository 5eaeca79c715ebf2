"""bench/common.py: the statistics, the tables and how ours is started, without running one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from virtualinux.bench import common
from virtualinux.bench.common import Report, Stat, interleaved, markdown, ours_command
from virtualinux.bootsvc.options import parse as parse_options
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm.command import vlx_command


def test_stat_is_median_min_max_of_the_runs():
    stat = Stat.of([3.0, 1.0, 10.0, 2.0])
    assert (stat.median, stat.low, stat.high, stat.runs) == (2.5, 1.0, 10.0, 4)
    assert stat.show() == "2.5 (1.0-10.0)"
    assert Stat.of([7.25]).show(2) == "7.25"
    with pytest.raises(ValueError):
        Stat.of([])


def test_interleaved_runs_round_by_round():
    order = []
    results = interleaved(2, {"ours": lambda: order.append("ours") or 1.0,
                              "peer": lambda: order.append("peer") or 2.0})
    assert order == ["ours", "peer", "ours", "peer"]
    assert results == {"ours": [1.0, 1.0], "peer": [2.0, 2.0]}


def test_markdown_table_shows_stats_and_missing_cells():
    text = markdown(["row", "ours"], [["a", Stat.of([1.0, 3.0])], ["b", None]])
    assert text.splitlines() == ["| row | ours |", "| --- | ---: |",
                                 "| a | 2.0 (1.0-3.0) |", "| b | - |"]


def test_report_writes_the_same_rows_as_json_with_load_and_command(tmp_path, capsys):
    report = Report("tftp", ["--repeat", "2"])
    report.table("TFTP", ["row", "ours"], [["curl", Stat.of([4.0, 6.0])]])
    report.note("a note")
    report.finish(tmp_path / "out.json")
    printed = capsys.readouterr().out
    assert "| curl | 5.0 (4.0-6.0) |" in printed
    assert "load average before" in printed and "a note" in printed
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["command"] == "python -m virtualinux.bench.tftp --repeat 2"
    assert len(data["load_before"]) == 3 and len(data["load_after"]) == 3
    assert data["tables"][0]["rows"] == [["curl", {"median": 5.0, "min": 4.0, "max": 6.0,
                                                   "runs": 2}]]


def test_ours_command_names_services_and_typed_settings():
    cmd = ours_command(Path("/db"), Path("/tree"), "198.18.0.1", ["dhcp", "tftp"],
                       settings={"tftp.workers": 2, "dhcp.receive_buffer": 4096})
    assert cmd[:3] == vlx_command()
    assert cmd[3:5] == ["--db", "/db"] and cmd[5:7] == ["bootsvc", "run"]
    assert ["--services", "dhcp,tftp"] == cmd[cmd.index("--services"):cmd.index("--services") + 2]
    sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    assert sets == ["tftp.workers=2", "dhcp.receive_buffer=4096"]
    # What the benches pass is what the daemon accepts: typed, checked options.
    options = parse_options(["dhcp", "tftp"], sets)
    assert options["dhcp"].receive_buffer == 4096 and options["tftp"].workers == 2


def test_pinning_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(common, "PIN", True)
    assert common.pinned("1", ["x"]) == ["taskset", "-c", "1", "x"]
    monkeypatch.setattr(common, "PIN", False)
    assert common.pinned("1", ["x"]) == ["x"]


def test_a_bench_ended_by_sigterm_still_removes_what_it_made(tmp_path):
    # A bench is killed by `kill` or `timeout`: its `finally` must still run, as on ^C, or
    # its namespaces and servers outlive it.
    made, ready = tmp_path / "made", tmp_path / "ready"
    script = f"""
import os, signal, time
from pathlib import Path
from virtualinux.bench import common

def main():
    Path({str(made)!r}).mkdir()
    try:
        Path({str(ready)!r}).touch()
        time.sleep(60)
        return 0
    finally:
        Path({str(made)!r}).rmdir()

raise SystemExit(common.run(main))
"""
    bench = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(ready.exists, timeout=30, what="the bench to start")
        assert made.is_dir()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        bench.kill()
    assert not made.exists()


def test_tree_cpu_seconds_counts_the_live_children_too():
    # A shell whose child burns 0.3 s of CPU and stays alive: the shell itself used ~none. The
    # child reads its own /proc CPU time (10 ms ticks), not process_time's finer clock.
    burn = ("import os, sys\n"
            "def used():\n"
            "    fields = open('/proc/self/stat').read().rsplit(')', 1)[1].split()\n"
            "    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')\n"
            "while used() < 0.3: pass\n"
            "print('burnt', flush=True)\n"
            "sys.stdin.read()\n")
    shell = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "$0"; true', burn],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout.readline() == "burnt\n"
        assert common.cpu_seconds(shell.pid) < 0.1
        assert common.tree_cpu_seconds(shell.pid) >= 0.3
    finally:
        shell.stdin.close()
        shell.wait(10)
    assert common.tree_cpu_seconds(shell.pid) == 0.0     # gone (reaped)
