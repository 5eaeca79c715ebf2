"""The node image's initramfs against a private tgtd with CHAP, in QEMU: the right login mounts
the root; a wrong CHAP secret, a missing target or an unreachable portal prints one console
line naming the target and the reason, then the node reboots (QEMU runs with -no-reboot, so a
reboot ends it): no shell, and the secret is never on the console.

The per-node cpio is the one netboot renders (scripts.node_cpio) for a cluster whose node1 has
a root volume and a CHAP credential, appended after the shared initrd as iPXE does."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from virtualinux.image.build import build_image, image_spec
from virtualinux.netboot import scripts
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import Cluster, Credential, Volume, inventory

from .conftest import EXAMPLE, require
from .test_image_build import private_san, qemu_cmd, run_until

pytestmark = pytest.mark.lab
IQN = "iqn.2026-11.lab.virtualinux:node1-root"
SECRET = "Wr0ng-or-right;$(reboot)'x"    # hostile on purpose: it must stay data
FAILURE_TIMEOUT = 240


@pytest.fixture(scope="module")
def node_image() -> Path:
    return build_image(image_spec("node"))


@pytest.fixture
def san(netns, node_image, tmp_path):
    """node1's root behind CHAP user node1 / SECRET on a private tgtd at 198.18.0.254."""
    require("qemu-system-x86_64")
    with private_san(netns, node_image, tmp_path, IQN, ("node1", SECRET),
                     control_offset=7) as (hub, tap, _):
        yield hub, tap


def node1_cluster(*, secret: str = SECRET, iqn: str = IQN,
                  portal: str = "198.18.0.254:3260") -> Cluster:
    """The example cluster whose node1 owns an exported root with a CHAP login (and the SSH
    host key the import made)."""
    cluster = inventory.apply(Cluster(generation=0, settings=None), inventory.load(EXAMPLE),
                              "test")
    root = Volume(name="node1-root", kind="snapshot", backend="reflink", path="/pool/node1",
                  size=1 << 30, origin="golden", owner="node1", iqn=iqn, portal=portal)
    return dataclasses.replace(cluster, volumes=(root,), credentials=cluster.credentials + (
        Credential("node1", "node1", secret),))


def node1_initrd(node_image: Path, tmp_path: Path, cluster: Cluster | None = None
                 ) -> tuple[Path, str]:
    """The shared initrd plus node1's cpio as netboot renders it; and node1's command line."""
    cluster = cluster or node1_cluster()
    node = cluster.node("node1")
    base = (node_image / "initrd.img").read_bytes()
    initrd = tmp_path / "initrd-node1.img"
    initrd.write_bytes(base + b"\0" * (-len(base) % 512) + scripts.node_cpio(cluster, node))
    # The real command line, minus iPXE's initrd= names (QEMU hands over one initrd).
    cmdline = " ".join(arg for arg in scripts.kernel_cmdline(cluster, node, ()).split()
                       if not arg.startswith("initrd="))
    return initrd, cmdline


def boot(node_image: Path, initrd: Path, cmdline: str, hub, tap, log: Path,
         *extra_args: str) -> subprocess.Popen:
    cmd = qemu_cmd(node_image, log, " ".join([cmdline, *extra_args]),
                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                   "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:11,romfile=")
    cmd[cmd.index("-initrd") + 1] = str(initrd)
    return subprocess.Popen(hub.prefix(cmd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_reboot(qemu: subprocess.Popen, log: Path) -> str:
    """-no-reboot: the guest's reboot is QEMU's exit. The console text."""
    try:
        qemu.wait(timeout=FAILURE_TIMEOUT)
    except subprocess.TimeoutExpired:
        qemu.kill()
        qemu.wait()
        pytest.fail(f"the node did not reboot within {FAILURE_TIMEOUT}s:\n"
                    f"{log.read_text(errors='replace')[-3000:]}")
    return log.read_text(errors="replace")


@pytest.mark.parametrize(("case", "reason"), [
    ("wrong secret", "authorization failure"),
    ("missing target", "no such target"),
    ("unreachable portal", "portal unreachable"),
])
def test_a_failed_root_login_names_target_and_reason_then_reboots(san, node_image, tmp_path,
                                                                   case, reason):
    hub, tap = san
    portal = "198.18.0.254:3260"
    if case == "wrong secret":
        initrd, cmdline = node1_initrd(node_image, tmp_path, node1_cluster(secret="not-the-secret"))
    elif case == "missing target":
        initrd, cmdline = node1_initrd(node_image, tmp_path, node1_cluster(iqn=IQN + "-gone"))
    else:
        portal = "198.18.0.77:3260"                 # nobody there: ARP goes unanswered
        initrd, cmdline = node1_initrd(node_image, tmp_path, node1_cluster(portal=portal))
    log = tmp_path / "serial.log"
    console = wait_for_reboot(boot(node_image, initrd, cmdline, hub, tap, log, "panic=5"), log)
    line = next((line for line in console.splitlines()
                 if line.startswith("virtualinux: iSCSI root ")), None)
    assert line is not None, console[-3000:]
    target = IQN + ("-gone" if case == "missing target" else "")
    assert line.startswith(f"virtualinux: iSCSI root {target} at {portal}: "), line
    assert reason in line, line
    assert sum(line.startswith("virtualinux: iSCSI") for line in console.splitlines()) == 1
    assert "Rebooting automatically" in console
    assert "(initramfs)" not in console and "Spawning shell" not in console   # no shell
    assert "not-the-secret" not in console and SECRET not in console


def test_the_default_delay_reboots_without_panic_on_the_command_line(san, node_image,
                                                                     tmp_path):
    """No panic= at all (netboot puts none there): the image's own default still reboots."""
    hub, tap = san
    initrd, cmdline = node1_initrd(node_image, tmp_path, node1_cluster(secret="not-the-secret"))
    log = tmp_path / "serial.log"
    console = wait_for_reboot(boot(node_image, initrd, cmdline, hub, tap, log), log)
    assert "authorization failure" in console
    assert "Rebooting automatically" in console and "(initramfs)" not in console


def test_a_shell_only_when_the_command_line_asks(san, node_image, tmp_path):
    hub, tap = san
    initrd, cmdline = node1_initrd(node_image, tmp_path, node1_cluster(secret="not-the-secret"))
    log = tmp_path / "serial.log"
    qemu = boot(node_image, initrd, cmdline, hub, tap, log, "vlx.debug=shell")
    try:
        deadline = time.monotonic() + FAILURE_TIMEOUT
        while "(initramfs)" not in (console := log.read_text(errors="replace")
                                    if log.exists() else ""):
            assert qemu.poll() is None, f"QEMU exited: {console[-3000:]}"
            assert time.monotonic() < deadline, console[-3000:]
            time.sleep(0.5)
        assert "authorization failure" in console and "Rebooting" not in console
    finally:
        qemu.kill()
        qemu.wait(timeout=10)


def test_the_right_secret_mounts_the_root_and_stays_off_argv_and_console(san, node_image,
                                                                         tmp_path):
    hub, tap = san
    initrd, cmdline = node1_initrd(node_image, tmp_path)
    log = tmp_path / "serial.log"
    cmd = qemu_cmd(node_image, log, cmdline,
                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                   "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:11,romfile=")
    cmd[cmd.index("-initrd") + 1] = str(initrd)
    console = run_until(hub.prefix(cmd), log, re.compile(r"^node1 login:", re.MULTILINE))
    assert "virtualinux: iSCSI" not in console
    assert SECRET not in console
    assert "/proc/cmdline" not in console


def test_the_node_files_of_its_cpio_reach_its_root_in_run(san, node_image, tmp_path):
    """break=init stops after the root is mounted and /run moved into it: the host key the
    cpio carried is in the root's /run/virtualinux/node, 0600 in a 0700 directory, byte for
    byte; a shell here only because the command line asked for one."""
    hub, tap = san
    cluster = node1_cluster()
    expected = scripts.node_files(cluster, cluster.node("node1"))
    assert expected                                  # the import made node1's host key
    initrd, cmdline = node1_initrd(node_image, tmp_path, cluster)
    log, console_socket = tmp_path / "serial.log", tmp_path / "console.sock"
    cmd = qemu_cmd(node_image, log, f"{cmdline} break=init",
                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                   "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:11,romfile=")
    serial = cmd.index("-serial")
    cmd[serial:serial + 2] = ["-chardev", f"socket,id=s0,path={console_socket},server=on,"
                              f"wait=off,logfile={log}", "-serial", "chardev:s0"]
    cmd[cmd.index("-initrd") + 1] = str(initrd)
    qemu = subprocess.Popen(hub.prefix(cmd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: console_socket.exists() or qemu.poll() is not None, 60,
                 "QEMU's console socket")
        with socket.socket(socket.AF_UNIX) as console:
            console.connect(str(console_socket))
            console.setblocking(False)

            def shows(text: str) -> bool:
                # Read what QEMU sends (its logfile keeps it): an unread socket stalls the UART.
                with contextlib.suppress(BlockingIOError):
                    while console.recv(65536):
                        pass
                return text in log.read_text(errors="replace") or qemu.poll() is not None

            wait_for(lambda: shows("(initramfs)"), FAILURE_TIMEOUT, "the shell at break=init")
            assert qemu.poll() is None, log.read_text(errors="replace")[-3000:]
            console.sendall(b"cd /root/run/virtualinux/node && stat -c 'MODE %a %n' . * "
                            b"&& sha256sum * && echo DONE-$((6*7))\n")
            wait_for(lambda: shows("DONE-42"), 60, "the listing of /run/virtualinux/node")
    finally:
        qemu.kill()
        qemu.wait(timeout=10)
    console = log.read_text(errors="replace")
    assert "MODE 700 ." in console
    for name, data in expected.items():
        assert f"MODE 600 {name}" in console
        assert f"{hashlib.sha256(data).hexdigest()}  {name}" in console
    assert SECRET not in console
