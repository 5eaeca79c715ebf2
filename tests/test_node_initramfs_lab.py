"""The node image's initramfs against a private tgtd with CHAP, in QEMU: the right login mounts
the root; a wrong CHAP secret, a missing target or an unreachable portal prints one console
line naming the target and the reason, then the node reboots (QEMU runs with -no-reboot, so a
reboot ends it): no shell, and the secret is never on the console.

The per-node cpio is the one netboot renders (scripts.node_cpio) for a cluster whose node1 has
a root volume and a CHAP credential, appended after the shared initrd as iPXE does."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from pathlib import Path

import pytest
from virtualinux.image.build import build_image, image_spec
from virtualinux.netboot import scripts
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
                     control_offset=7) as (hub, tap):
        yield hub, tap


def node1_initrd(node_image: Path, tmp_path: Path, *, secret: str = SECRET, iqn: str = IQN,
                 portal: str = "198.18.0.254:3260") -> tuple[Path, str]:
    """The shared initrd plus node1's cpio as netboot renders it; and node1's command line."""
    cluster = inventory.apply(Cluster(generation=0, settings=None), inventory.load(EXAMPLE), "test")
    root = Volume(name="node1-root", kind="snapshot", backend="reflink", path="/pool/node1",
                  size=1 << 30, origin="golden", owner="node1", iqn=iqn, portal=portal)
    cluster = dataclasses.replace(cluster, volumes=(root,),
                                  credentials=(Credential("node1", "node1", secret),))
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
        initrd, cmdline = node1_initrd(node_image, tmp_path, secret="not-the-secret")
    elif case == "missing target":
        initrd, cmdline = node1_initrd(node_image, tmp_path, iqn=IQN + "-gone")
    else:
        portal = "198.18.0.77:3260"                 # nobody there: ARP goes unanswered
        initrd, cmdline = node1_initrd(node_image, tmp_path, portal=portal)
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
    initrd, cmdline = node1_initrd(node_image, tmp_path, secret="not-the-secret")
    log = tmp_path / "serial.log"
    console = wait_for_reboot(boot(node_image, initrd, cmdline, hub, tap, log), log)
    assert "authorization failure" in console
    assert "Rebooting automatically" in console and "(initramfs)" not in console


def test_a_shell_only_when_the_command_line_asks(san, node_image, tmp_path):
    hub, tap = san
    initrd, cmdline = node1_initrd(node_image, tmp_path, secret="not-the-secret")
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
