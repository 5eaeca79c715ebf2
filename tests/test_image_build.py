"""Real node and guest builds (diskimage-builder, minutes when cold; the cache under
/var/cache/virtualinux/images keeps later runs to seconds): the node's kernel and initrd boot
in QEMU to its initramfs, its root image holds virtualinux and nothing per node, the guest
boots to a login prompt with the name and address DHCP gave it, the node mounts its root over
iSCSI from tgt, and a failing element is named with its phase while nothing half-built is
left."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from virtualinux.image import build, cache
from virtualinux.image.build import build_image, image_spec
from virtualinux.netboot import cpio
from virtualinux.storage.tgt import TgtAdmin
from virtualinux.vvcm.errors import VlxError

from .conftest import dnsmasq_dhcp, require

pytestmark = pytest.mark.lab
BOOT_TIMEOUT = 240


@pytest.fixture(scope="module")
def node_image() -> Path:
    return build_image(image_spec("node"))


@pytest.fixture(scope="module")
def guest_image() -> Path:
    return build_image(image_spec("guest"))


def cpio_names(initrd: Path) -> set[str]:
    """File names in an initramfs-tools initrd: an optional plain early archive, then one
    compressed archive (zstd here)."""
    data = initrd.read_bytes()
    names: set[str] = set()
    if data.startswith(b"070701"):
        end = data.index(b"TRAILER!!!") + len(b"TRAILER!!!")
        names |= {n.decode() for n in re.findall(rb"070701[0-9A-Fa-f]{104}([^\0]+)\0",
                                                  data[:end])}
        data = data[end:].lstrip(b"\0")
    plain = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    names |= {n.decode() for n in re.findall(rb"070701[0-9A-Fa-f]{104}([^\0]+)\0", plain)}
    return {name.removeprefix("./") for name in names}


def run_until(cmd: list[str], log: Path, pattern: re.Pattern[str]) -> str:
    """Start QEMU, wait for `pattern` on its serial log, always kill it; the console text."""
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            console = log.read_text(errors="replace") if log.exists() else ""
            if pattern.search(console):
                return console
            if qemu.poll() is not None:
                pytest.fail(f"QEMU exited {qemu.returncode}: {qemu.stderr.read()!r}\n"
                            f"{console[-3000:]}")
            time.sleep(0.5)
        pytest.fail(f"no {pattern.pattern!r} within {BOOT_TIMEOUT}s:\n{console[-3000:]}")
    finally:
        qemu.kill()
        qemu.wait(timeout=10)


def qemu_cmd(image: Path, log: Path, append: str, *extra: str) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", f"file:{log}",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", f"console=ttyS0 {append}", *extra]


def test_node_initrd_carries_the_iscsi_hook_and_an_empty_iscsi_config(node_image):
    require("zstd")
    names = cpio_names(node_image / "initrd.img")
    # Our login script (iscsid + a node record: no secret on argv) replaces open-iscsi's.
    wanted = {"iscsid", "iscsiadm", "iscsistart"}
    assert {name.rsplit("/", 1)[-1] for name in names if "sbin/" in name} >= wanted
    assert {"etc/iscsi.initramfs", "etc/passwd", "scripts/local-top/virtualinux-iscsi",
            "scripts/init-bottom/virtualinux-node-files",
            "conf/conf.d/virtualinux-node"} <= names
    assert "scripts/local-top/iscsi" not in names
    assert any(name.endswith("/iscsi_tcp.ko") for name in names)
    assert "etc/initiatorname.iscsi" not in names


def test_node_kernel_and_initrd_boot_in_qemu_to_the_initramfs(node_image, tmp_path):
    require("qemu-system-x86_64")
    log = tmp_path / "serial.log"
    # break=mount: initramfs-tools stops with a shell just before it would mount the root.
    console = run_until(qemu_cmd(node_image, log, "break=mount", "-nic", "none"), log,
                        re.compile(r"Spawning shell within the initramfs"))
    assert "Run /init as init process" in console


def test_node_root_image_holds_virtualinux_and_no_node_identity(node_image, tmp_path):
    manifest = cache.read_manifest(node_image)
    assert any(wheel.startswith("virtualinux-") for wheel in manifest["wheels"])
    assert {"open-iscsi", "libvirt-daemon-system", "chrony", "qemu-system-x86", "nftables"} \
        <= set(manifest["packages"])
    mount = tmp_path / "root"
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop,ro,noload", str(node_image / "root.img"), str(mount)],
                   check=True, capture_output=True)
    try:
        imported = subprocess.run(
            ["chroot", str(mount), "/opt/virtualinux/bin/python", "-c",
             "import importlib.util, virtualinux.vvcm.model, virtualinux.image.tiny\n"
             "assert importlib.util.find_spec('virtualinux.vm_test') is None\n"
             "assert importlib.util.find_spec('virtualinux.bench') is None\n"
             "print('ok')"],
            capture_output=True, text=True, timeout=60)
        assert imported.stdout.strip() == "ok", imported.stderr
        assert os.path.islink(mount / "usr/local/bin/vlx")
        assert not (mount / "etc/hostname").exists()
        # Empty, or DIB's "uninitialized" (systemd: first boot, make one): never an id.
        assert (mount / "etc/machine-id").read_text() in ("", "uninitialized\n")
        assert not list((mount / "etc/ssh").glob("ssh_host_*_key"))
        assert not (mount / "etc/iscsi/initiatorname.iscsi").exists()
        assert "LABEL=vroot" in (mount / "etc/fstab").read_text()
        # Debian's default etcd member (on localhost) stays off: a node's is ours.
        wants = mount / "etc/systemd/system/multi-user.target.wants"
        assert not (wants / "etcd.service").is_symlink()
        assert (wants / "virtualinux-etcd.service").is_symlink()     # to an absolute path
        # No boot-time ssh-keygen -A on a node handed its key.
        units = mount / "etc/systemd/system"
        assert "ConditionPathExists=!/run/virtualinux/node/ssh-host-key" in (
            units / "virtualinux-ssh-host-keys.service.d/virtualinux-node.conf").read_text()
        # iscsid adopts the root's session only with the record the initramfs handed over.
        dropin = (units / "iscsid.service.d/virtualinux-node.conf").read_text()
        assert "ConditionPathExists=/run/virtualinux/iscsi/nodes" in dropin
        assert "Requires=etc-iscsi-nodes.mount" in dropin
        # Nothing iscsid reads while it logs the root in again may be on the root.
        assert "Environment=OPENSSL_CONF=/dev/null" in dropin
        assert (units / "sysinit.target.wants/iscsid.service").is_symlink()
        assert "What=/run/virtualinux/iscsi/nodes" in (units / "etc-iscsi-nodes.mount").read_text()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_unchanged_inputs_return_the_cached_node_at_once(node_image):
    said: list[str] = []
    assert build_image(image_spec("node"), progress=said.append) == node_image
    # A cache hit says so and nothing else: no "building", no phases.
    key = node_image.name.removeprefix("node-")
    assert len(said) == 1 and said[0].endswith(f"cached: node {key}"), said


def test_guest_boots_to_login_with_the_name_and_address_from_dhcp(netns, guest_image,
                                                                   tmp_path):
    require("qemu-system-x86_64", "dnsmasq")
    leases = tmp_path / "leases"
    with dnsmasq_dhcp(netns, leases, "52:54:00:00:00:31,198.18.0.31,vm1") as (hub, tap):
        log = tmp_path / "serial.log"
        # snapshot=on: the guest writes to a temporary overlay, never to the golden image.
        cmd = hub.prefix(qemu_cmd(
            guest_image, log, "root=LABEL=vroot rw",
            "-drive", f"file={guest_image / 'root.img'},format=raw,if=virtio,snapshot=on",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:31,romfile="))
        run_until(cmd, log, re.compile(r"^vm1 login:", re.MULTILINE))
        assert "198.18.0.31" in (tmp_path / "leases").read_text()


def test_a_failing_element_is_named_with_its_phase_and_leaves_nothing(tmp_path, monkeypatch):
    # No wheels: virtualinux-node's extra-data.d script must stop the build.
    def no_wheels(spec, work, log_path):
        (work / "wheels").mkdir()
        return work / "wheels"

    monkeypatch.setattr(build, "build_wheels", no_wheels)
    root = tmp_path / "cache"
    root.mkdir()
    shared = cache.cache_root() / "dib-cache"    # reuse debootstrap's tarball: seconds, not 1 min
    shared.mkdir(exist_ok=True)
    (root / "dib-cache").symlink_to(shared)
    out = tmp_path / "out"
    with pytest.raises(VlxError) as failure:
        build_image(image_spec("node"), out_dir=out, cache_dir=root,
                    progress=lambda message: None)
    message = str(failure.value)
    assert "element virtualinux-node, phase extra-data.d, script 50-virtualinux-wheels" \
        in message
    log = Path(re.search(r"full log: (\S+)", message).group(1))
    assert "DIB_VLX_WHEEL_DIR names no directory" in log.read_text()
    assert not out.exists()
    assert cache.entries(root) == []
    assert not [path for path in root.iterdir() if "building" in path.name]


@contextlib.contextmanager
def private_san(netns, node_image: Path, tmp_path: Path, iqn: str,
                chap: tuple[str, str] | None = None, control_offset: int = 0):
    """A private tgtd (own control port) in a lab namespace at 198.18.0.254 exporting a copy of
    the node's root.img (tmp_path/node1.img) as LUN 1 of `iqn`, behind CHAP user and secret
    `chap` if given; yields (hub, tap, its TgtAdmin). Everything is removed afterwards, pass or
    fail."""
    require("tgtd", "tgtadm")
    hub = netns.namespace("hub")
    bridge = netns.bridge(hub)
    hub.add_address(bridge, "198.18.0.254/24")
    tap = netns.tap(hub, bridge, "tap0")
    clone = tmp_path / "node1.img"
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(node_image / "root.img"),
                    str(clone)], check=True)
    # tgtd takes at most 32767; storage uses 20000+
    control = str(5000 + (os.getpid() + control_offset) % 10000)
    tgtd = hub.popen(["tgtd", "-f", "-C", control, "--iscsi", "portal=198.18.0.254:3260"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def tgtadm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tgtadm", "-C", control, "--lld", "iscsi", *args],
                              capture_output=True, text=True, check=check)

    try:
        deadline = time.monotonic() + 10
        while tgtadm("--op", "show", "--mode", "target", check=False).returncode != 0:
            assert time.monotonic() < deadline, "tgtd did not start"
            time.sleep(0.2)
        tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
        tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
               "-b", str(clone))
        tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        if chap is not None:
            tgtadm("--op", "new", "--mode", "account", "--user", chap[0], "--password", chap[1])
            tgtadm("--op", "bind", "--mode", "account", "--tid", "1", "--user", chap[0])
        yield hub, tap, TgtAdmin(int(control))
    finally:
        # A guest killed mid-session leaves its session: --force (LAB.md).
        tgtadm("--op", "delete", "--mode", "target", "--tid", "1", "--force", check=False)
        tgtd.terminate()
        try:
            tgtd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tgtd.kill()
            tgtd.wait()
        for leftover in (f"socket.{control}", f"socket.{control}.lock"):   # tgtd leaves them
            Path("/var/run/tgtd", leftover).unlink(missing_ok=True)


@pytest.fixture
def tgt_target(netns, node_image, tmp_path):
    iqn = "iqn.2026-11.lab.virtualinux:node1"
    with private_san(netns, node_image, tmp_path, iqn) as (hub, tap, _):
        yield hub, tap, iqn


def test_node_mounts_its_root_over_iscsi_and_reaches_login(tgt_target, node_image, tmp_path):
    """The shared initrd plus a per-node cpio holding etc/iscsi.initramfs (as netboot appends
    it, after padding the base to 512 bytes): our initramfs script logs in, the root is found
    by its label, and the node comes up with the name that ip= gave it."""
    hub, tap, iqn = tgt_target
    settings = (f"ISCSI_INITIATOR=iqn.2026-11.lab.virtualinux:initiator.node1\n"
                f"ISCSI_TARGET_NAME={iqn}\nISCSI_TARGET_IP=198.18.0.254\n"
                "ISCSI_TARGET_PORT=3260\n").encode()
    base = (node_image / "initrd.img").read_bytes()
    initrd = tmp_path / "initrd-node1.img"
    initrd.write_bytes(base + b"\0" * (-len(base) % 512) + cpio.archive(
        [cpio.directory("etc"), cpio.regular("etc/iscsi.initramfs", settings)]))
    log = tmp_path / "serial.log"
    cmd = qemu_cmd(node_image, log,
                   "ip=198.18.0.11::198.18.0.254:255.255.255.0:node1:eth0:off "
                   "root=LABEL=vroot rw panic=-1",
                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                   "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:11,romfile=")
    cmd[cmd.index("-initrd") + 1] = str(initrd)
    console = run_until(hub.prefix(cmd), log, re.compile(r"^node1 login:", re.MULTILINE))
    # Logged in by our initramfs script (iscsid from a node record): the LUN is attached and
    # no failure line was printed.
    assert "[sda] Attached SCSI disk" in console and "virtualinux: iSCSI" not in console
