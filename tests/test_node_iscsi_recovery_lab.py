"""A node's root session survives a network error. The node image boots over iSCSI from a
private tgtd with CHAP (its initramfs, its units, node1's cpio as netboot renders it); the
running root's iscsid adopts the session with the node record the initramfs handed over on
tmpfs. tgtd then closes the root's connection: the guest's kernel reports the error, iscsid
logs in again (a new connection on tgtd), and a file written and synced after the cut is in the
snapshot file on the SAN side once the node is stopped.

The test reaches the guest through a root shell on its second serial port, started by systemd's
own `systemd.run=` (systemd-run-generator) and pulled into the ordinary multi-user boot, so the
node boots as it does in a cluster. QEMU's socket chardev carries it; its logfile keeps it."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from virtualinux.image.build import build_image, image_spec
from virtualinux.storage.tgt import TgtAdmin
from virtualinux.vm_test.wait import wait_for

from .conftest import require
from .test_image_build import private_san, qemu_cmd
from .test_node_initramfs_lab import IQN, SECRET, node1_initrd

pytestmark = pytest.mark.lab
BOOT_TIMEOUT = 900          # the node image to its login prompt in TCG, on a shared machine
RECOVERY_TIMEOUT = 300
# A fragment of SECRET safe in a guest command line; [t] keeps grep from finding itself.
SECRET_PATTERN = "Wr0ng-or-righ[t]"
# The guest's shell on ttyS1: systemd.run= makes kernel-command-line.service of it, which
# multi-user.target (the node's default) then wants; it stays up whatever it does.
SHELL_ARGS = ("systemd.run=\"/bin/sh -c 'exec </dev/ttyS1 >/dev/ttyS1 2>&1; "
              "echo guest-shell-ready; exec /bin/sh'\" systemd.run_success_action=none "
              "systemd.run_failure_action=none systemd.unit=multi-user.target "
              "systemd.wants=kernel-command-line.service")
CONN_ERROR = re.compile(r"connection(\d+):0: detected conn error \((\d+)\)")


@pytest.fixture(scope="module")
def node_image() -> Path:
    return build_image(image_spec("node"))


@pytest.fixture
def san(netns, node_image, tmp_path):
    require("qemu-system-x86_64", "tgtd", "tgtadm")
    with private_san(netns, node_image, tmp_path, IQN, ("node1", SECRET),
                     control_offset=13) as (hub, tap, admin):
        yield hub, tap, admin


class GuestShell:
    """The root shell on the node's second serial port."""

    def __init__(self, path: Path):
        self.socket = socket.socket(socket.AF_UNIX)
        self.socket.connect(str(path))
        self.socket.setblocking(False)
        self.seen = b""
        self.commands = 0

    def close(self) -> None:
        self.socket.close()

    def text(self) -> str:
        # Read all QEMU has: an unread socket would stall the guest's UART.
        with contextlib.suppress(BlockingIOError):
            while data := self.socket.recv(65536):
                self.seen += data
        return self.seen.decode(errors="replace").replace("\r\n", "\n")

    def run(self, command: str, timeout: float = 120, check: bool = True) -> str:
        """`command`'s output (stdout and stderr) once it has ended."""
        self.commands += 1
        start = len(self.text())
        # The tty echoes the line as sent; only the shell's expansion prints the marker.
        echoed = f"echo \"@@$(({self.commands}*7))@@ $?\""
        self.socket.sendall(f"{{ {command}; }} 2>&1; {echoed}\n".encode())
        marker = re.compile(rf"^@@{self.commands * 7}@@ (\d+)$", re.MULTILINE)
        done = wait_for(lambda: marker.search(self.text(), start), timeout,
                        f"the guest to run {command!r}", interval=0.5)
        text = self.text()
        # What follows the echoed command line (and the shell's prompt, should it come late).
        said = text[text.index(echoed, start) + len(echoed):done.start()].removeprefix("\n")
        said = said.removeprefix("# ")
        if check:
            assert done[1] == "0", f"{command!r} exited {done[1]}:\n{said}"
        return said


def nexuses(admin: TgtAdmin) -> list[tuple[int, int, str]]:
    """tgtd's sessions (I_T nexus) and their connections: (sid, cid, initiator address)."""
    shown = admin.run("--mode", "target", "--op", "show")
    return [(int(sid), int(cid), address) for sid, cid, address in re.findall(
        r"I_T nexus: (\d+)\n\s+Initiator: .*\n\s+Connection: (\d+)\n\s+IP Address: (\S+)",
        shown)]


def peer_ports(hub) -> set[int]:
    """The initiator ports of the established TCP connections to the portal, from the SAN
    namespace's /proc/net/tcp (read through a process that lives there: tgtd)."""
    table = Path(f"/proc/{hub.pids()[0]}/net/tcp").read_text().splitlines()[1:]
    ports = set()
    for line in table:
        local, remote, state = line.split()[1:4]
        if state == "01" and int(local.split(":")[1], 16) == 3260:
            ports.add(int(remote.split(":")[1], 16))
    return ports


def recoveries(shell: GuestShell) -> list[str]:
    """iscsid's lines for the logins it made on a session it holds (its adoption is one)."""
    said = shell.run("journalctl -b -o cat --no-pager -u iscsid.service", check=False)
    return re.findall(r"connection\d+:0 is operational after recovery \(\d+ attempts\)", said)


def adopted(shell: GuestShell) -> bool:
    """iscsid holds the root's session (its own state, not only the kernel's), logged in."""
    said = shell.run("iscsiadm -m session -P 1", check=False)
    return ("iSCSI Session State: LOGGED_IN" in said
            and "Internal iscsid Session State: NO CHANGE" in said)


def test_the_root_session_is_logged_in_again_after_the_target_drops_its_connection(
        san, node_image, tmp_path):
    hub, tap, admin = san
    initrd, cmdline = node1_initrd(node_image, tmp_path)
    log, shell_log = tmp_path / "serial.log", tmp_path / "shell.log"
    shell_socket = tmp_path / "shell.sock"
    cmd = qemu_cmd(node_image, log, f"{cmdline} {SHELL_ARGS}",
                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                   "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:11,romfile=",
                   "-chardev", f"socket,id=shell,path={shell_socket},server=on,wait=off,"
                   f"logfile={shell_log}", "-serial", "chardev:shell")
    cmd[cmd.index("-initrd") + 1] = str(initrd)
    started = time.monotonic()
    qemu = subprocess.Popen(hub.prefix(cmd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shell = None
    token = f"written-after-the-cut-{time.time_ns()}"
    try:
        wait_for(lambda: shell_socket.exists() or qemu.poll() is not None, 60,
                 "QEMU's shell socket")
        assert qemu.poll() is None, qemu.stderr.read()
        shell = GuestShell(shell_socket)

        def console() -> str:
            assert qemu.poll() is None, f"QEMU exited: {log.read_text(errors='replace')[-3000:]}"
            return log.read_text(errors="replace")

        wait_for(lambda: re.search(r"^node1 login:", console(), re.MULTILINE), BOOT_TIMEOUT,
                 "node1's login prompt", interval=1)
        wait_for(lambda: "guest-shell-ready" in shell.text(), 120, "the guest's shell")
        print(f"login prompt {time.monotonic() - started:.0f} s after QEMU started")

        # iscsid runs with the record the initramfs handed over, and has taken the session.
        said = shell.run("systemctl is-active iscsid.service etc-iscsi-nodes.mount")
        assert said.split() == ["active", "active"], said
        wait_for(lambda: adopted(shell), 300, "iscsid to adopt the root's session", interval=2)
        said = shell.run("iscsiadm -m session")
        assert f"198.18.0.254:3260,1 {IQN}" in said, said
        # Its login (at adoption iscsid logs the session in again) took the record's
        # timeouts: no NOP-Out pings, a day's recovery (iscsid.conf would say 5 s and 120 s).
        said = shell.run("cat /sys/class/iscsi_session/session*/recovery_tmo "
                         "/sys/class/iscsi_connection/connection*/recv_tmo "
                         "/sys/class/iscsi_connection/connection*/ping_tmo")
        assert said.split() == ["86400", "0", "0"], said
        # ...and reconnected at once: its adoption stops the connection and waits the
        # record's DefaultTime2Wait (open-iscsi's default 2 s) before it opens its own.
        said = shell.run(f"iscsiadm -m node -T {IQN} -o show | grep DefaultTime2Wait")
        assert said.strip() == "node.session.iscsi.DefaultTime2Wait = 0", said
        print("kernel at adoption:", shell.run("dmesg | grep -E 'conn error|operational|"
                                               "device reset'", check=False))
        # The record (with the CHAP login) is on tmpfs, for root only; the secret is in no
        # argv and no log.
        said = shell.run("stat -c '%a %U %n' /run/virtualinux/iscsi/nodes "
                         "/run/virtualinux/iscsi/nodes/*/*/default; "
                         "findmnt -n -o FSTYPE --target /etc/iscsi/nodes")
        assert said.split("\n")[0].startswith("700 root "), said
        assert re.search(r"^600 root /run/virtualinux/iscsi/nodes/.*/default$", said,
                         re.MULTILINE), said
        assert said.split()[-1] == "tmpfs", said
        said = shell.run(f"ps -eo args | grep -c '{SECRET_PATTERN}'; "
                         f"journalctl -b -o cat --no-pager | grep -c '{SECRET_PATTERN}'; "
                         f"grep -c '{SECRET_PATTERN}' /proc/cmdline", check=False)
        assert said.split() == ["0", "0", "0"], said

        adoption = recoveries(shell)
        print("iscsid at adoption:", adoption)
        assert len(adoption) == 1, adoption
        before = nexuses(admin)
        ports_before = peer_ports(hub)
        assert [address for _, _, address in before] == ["198.18.0.11"], before
        assert len(ports_before) == 1, ports_before
        sid, cid, _ = before[0]
        print("tgtd before the cut:", before, "initiator port", ports_before)
        cut = time.monotonic()
        admin.run("--mode", "conn", "--op", "delete", "--tid", "1", "--sid", str(sid),
                  "--cid", str(cid))
        # The guest's kernel saw the connection go.
        error = wait_for(lambda: CONN_ERROR.search(shell.run("dmesg | grep 'conn error'",
                                                             check=False)), RECOVERY_TIMEOUT,
                         "the guest's kernel to report the connection error", interval=1)
        print(f"guest kernel: {error[0]} ({time.monotonic() - cut:.1f} s after the cut)")
        # A file written and synced now: sync returns only once the session is back.
        shell.run(f"echo {token} > /root/after-the-cut && sync", timeout=RECOVERY_TIMEOUT)
        synced = time.monotonic() - cut
        # iscsid logged it in again: one new session and connection on tgtd, from another
        # port.
        after = wait_for(lambda: nexuses(admin), RECOVERY_TIMEOUT, "a session on tgtd again")
        ports_after = peer_ports(hub)
        print(f"tgtd after: {after}, initiator port {ports_after}; sync returned "
              f"{synced:.1f} s after the cut")
        assert [address for _, _, address in after] == ["198.18.0.11"], after
        assert after[0][0] != sid, after            # a new session on tgtd: a new login
        assert len(ports_after) == 1 and not ports_after & ports_before
        assert adopted(shell)
        again = recoveries(shell)
        print("iscsid after the cut:", again[1:])
        assert len(again) == 2, again
        said = shell.run("cat /sys/class/iscsi_session/session*/recovery_tmo "
                         "/sys/class/iscsi_connection/connection*/recv_tmo "
                         "/sys/class/iscsi_connection/connection*/ping_tmo")
        assert said.split() == ["86400", "0", "0"], said
        assert SECRET not in shell.text() and SECRET not in console()
    finally:
        if shell is not None:
            shell.close()
        qemu.kill()
        qemu.wait(timeout=30)

    # On the SAN side, in the snapshot file itself: the file written after the cut; the
    # secret nowhere (its record lived on tmpfs). The copy is mounted, so its journal is
    # replayed there and never on the snapshot.
    copy, mount = tmp_path / "check.img", tmp_path / "check"
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(tmp_path / "node1.img"),
                    str(copy)], check=True)
    assert subprocess.run(["grep", "-c", "-a", "-F", "--", SECRET, str(copy)],
                          capture_output=True, text=True).stdout.strip() == "0"
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(copy), str(mount)], check=True)
    try:
        assert (mount / "root/after-the-cut").read_text() == token + "\n"
        assert not any((mount / "etc/iscsi/nodes").iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        copy.unlink()
