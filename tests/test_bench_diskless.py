"""bench/diskless.py without booting anything: the console lines it reads, and its tables."""

from __future__ import annotations

from virtualinux.bench import diskless
from virtualinux.bench.common import Stat

# Excerpts of a real node-image boot's serial log (tests/test_node_initramfs_lab.py's).
CONSOLE = (
    b"[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)\r\n"
    b"[    0.000000] Command line: console=ttyS0 systemd.mask=virtualinux-startup.service\r\n"
    b"[   14.585050] scsi host2: iSCSI Initiator over TCP/IP\r\n"
    b"[   14.767579] scsi 2:0:0:0: RAID              IET      Controller       0001\r\n"
    b"[   15.592589] sd 2:0:0:1: [sda] Attached SCSI disk\r\n"
    b"[   17.746142] EXT4-fs (sda): mounted filesystem with ordered data mode.\r\n"
    b"\r\nDebian GNU/Linux 12 node1 ttyS0\r\n\r\nnode1 login: ")


def test_console_phases_follow_a_boot_line_by_line():
    text = diskless.console_text(CONSOLE)
    cut = {phase: text.index(marker) for phase, marker in
           (("iscsi", "scsi 2:0:0:0"), ("root", "[   17."), ("login", "\nDebian GNU"))}
    assert diskless.console_phases(text[:cut["iscsi"]]) == ["kernel"]
    # "scsi host2:" is the session's host, made before the login: not yet logged in.
    assert "scsi host2" in text[:cut["iscsi"]]
    assert diskless.console_phases(text[:cut["root"]]) == ["kernel", "iscsi"]
    assert diskless.console_phases(text[:cut["login"]]) == ["kernel", "iscsi", "root"]
    # The prompt has no line end after it: it counts all the same.
    assert diskless.console_phases(text) == ["kernel", "iscsi", "root", "login"]
    assert diskless.console_failure(text) is None


def test_a_kernel_message_after_the_login_prompt_does_not_hide_it():
    # Seen in a bench run: the bench waited for a prompt the console had shown.
    text = diskless.console_text(CONSOLE + b"[   34.675425] kvm: Nested Virtualization enabled\r\n")
    assert diskless.console_phases(text) == ["kernel", "iscsi", "root", "login"]
    assert diskless.console_phases(diskless.console_text(
        b"[  OK  ] Started systemd-logind.service - User Login Management.\r\n")) == []


def test_a_failed_login_or_a_panic_ends_the_wait_with_its_line():
    failed = (b"virtualinux: iSCSI root iqn.2026-11.lab.virtualinux:node1-root at "
              b"198.18.0.252:3260: login refused: authorization failure\r\nRebooting in 15")
    assert diskless.console_failure(diskless.console_text(failed)) == (
        "virtualinux: iSCSI root iqn.2026-11.lab.virtualinux:node1-root at 198.18.0.252:3260: "
        "login refused: authorization failure")
    assert diskless.console_failure("Kernel panic - not syncing: VFS\n") == \
        "Kernel panic - not syncing: VFS"
    # The root's session dropped under load and was not recovered: its disk is gone.
    lost = "[  340.899893]  session1: session recovery timed out after 120 secs\r\n"
    assert diskless.console_failure(diskless.console_text(lost.encode())) == \
        "session1: session recovery timed out after 120 secs"


def test_our_units_are_seen_starting_but_not_in_the_mask_on_the_command_line():
    assert not diskless.OUR_UNIT_LINE.search(diskless.console_text(CONSOLE))
    assert diskless.OUR_UNIT_LINE.search(
        "         Starting \x1b[0;1;39mvirtualinux-start\u2026e, boot services...\n")
    assert all(arg.startswith("systemd.mask=virtualinux-")
               for arg in diskless.STOCK_KERNEL_ARGS[len(diskless.KERNEL_ARGS):])


def boot(*nodes: dict[str, float]) -> dict[str, dict[str, float]]:
    return {f"node{i}": phases for i, phases in enumerate(nodes, start=1)}


RESULTS = {
    (1, "ours"): [boot({"kernel": 10, "iscsi": 20, "root": 25, "login": 40, "serving": 45})],
    (1, "stock"): [boot({"kernel": 10, "iscsi": 22, "root": 26, "login": 50})],
    (3, "ours"): [boot({"login": 50, "serving": 55}, {"login": 60, "serving": 70},
                       {"login": 55, "serving": 58})],
    (3, "stock"): [boot({"login": 70}, {"login": 60}, {"login": 65})],
}


def test_phase_rows_hold_every_node_and_the_last_one_of_a_run():
    rows = {(row[0], row[1]): row for row in diskless.phase_rows(RESULTS, [1, 3])}
    assert list(rows) == [(1, "ours"), (1, "stock"), (3, "ours"), (3, "stock")]
    assert rows[(1, "ours")][2:] == [Stat.of([10]), Stat.of([20]), Stat.of([25]),
                                     Stat.of([40]), Stat.of([45]), None, Stat.of([5])]
    assert rows[(1, "stock")][6] is None and rows[(1, "stock")][8] is None
    assert rows[(3, "ours")][5] == Stat.of([50, 60, 55])
    assert rows[(3, "ours")][7] == Stat.of([70])         # the last node's serving
    assert rows[(3, "ours")][8] == Stat.of([5, 10, 3])
    assert rows[(3, "stock")][7] == Stat.of([70])        # the last node's login prompt


def test_goal_rows_say_which_goals_are_met():
    goals = {(row[0], row[1]): row[2:] for row in diskless.goal_rows(RESULTS, [1, 3])}
    assert goals[("login prompt, ours / stock", 1)] == ["0.80", "<= 1", "yes"]
    assert goals[("login prompt, ours / stock", 3)] == ["0.85", "<= 1", "yes"]
    assert goals[("serving - login prompt, ours (s)", 3)] == ["5.00", "<= 10", "yes"]
    # 70 s for the last of 3 against 45 s alone: 1.56x, over 1.3x.
    assert goals[("last serving of 3 / 1 alone, ours", 3)] == ["1.56", "<= 1.3", "NO"]
    assert goals[("last login of 3 / 1 alone, stock", 3)] == ["1.40", "<= 1.3", "NO"]


def test_a_side_not_run_leaves_out_what_needs_it():
    ours_only = {key: value for key, value in RESULTS.items() if key[1] == "ours"}
    goals = [row[0] for row in diskless.goal_rows(ours_only, [1, 3])]
    assert "login prompt, ours / stock" not in goals
    assert "last login of 3 / 1 alone, stock" not in goals
    assert "serving - login prompt, ours (s)" in goals


def test_ours_is_done_when_it_serves_and_prompts_stock_when_it_prompts():
    assert not diskless.finished("ours", {"root": 190.0, "serving": 1289.0})
    assert not diskless.finished("ours", {"login": 300.0})
    assert diskless.finished("ours", {"login": 1300.0, "serving": 1289.0})
    assert diskless.finished("stock", {"login": 306.0})
    assert not diskless.finished("stock", {"root": 182.0})
