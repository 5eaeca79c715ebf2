"""The tiny lab image: built from Debian's cloud kernel and busybox, booted in QEMU (TCG) on a
tap in a namespace; the node must print its one line and really answer on its address."""

from __future__ import annotations

import gzip
import re
import subprocess
import time
from pathlib import Path

import pytest
from virtualinux.image.tiny import build_tiny
from virtualinux.netboot import cpio

from .conftest import dnsmasq_dhcp, require

UP_LINE = re.compile(r"^virtualinux: node (\S+) up (\S+)\r?$", re.MULTILINE)
BOOT_TIMEOUT = 90


@pytest.fixture(scope="module")
def tiny() -> Path:
    # The default cache on purpose: it survives across runs, so only the first run builds.
    return build_tiny()


def boot(hub, tiny: Path, tap: str, mac: str, append: str, log: Path,
         wait_for: re.Pattern[str]) -> tuple[subprocess.Popen, str]:
    """Start QEMU on `tap` and return once `wait_for` shows on its serial console."""
    qemu = hub.popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-no-reboot",
                      "-display", "none", "-monitor", "none", "-serial", f"file:{log}",
                      "-kernel", str(tiny / "vmlinuz"), "-initrd", str(tiny / "initrd.img"),
                      "-append", f"console=ttyS0 {append}",
                      "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                      "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        console = log.read_text(errors="replace") if log.exists() else ""
        if wait_for.search(console):
            return qemu, console
        if qemu.poll() is not None:
            pytest.fail(f"QEMU exited {qemu.returncode}: {qemu.stderr.read()!r}\n{console}")
        time.sleep(0.2)
    qemu.kill()
    pytest.fail(f"no {wait_for.pattern!r} within {BOOT_TIMEOUT}s:\n{console}")


def stop(qemu: subprocess.Popen) -> None:
    qemu.kill()
    qemu.wait(timeout=10)


@pytest.mark.lab
def test_initrd_holds_busybox_init_and_virtio_modules_in_load_order(tiny):
    archive = gzip.decompress((tiny / "initrd.img").read_bytes())
    names = re.findall(rb"070701[0-9A-F]{104}([^\0]+)\0", archive)
    for needed in (b"init", b"bin/busybox", b"bin/udhcpc", b"dev/console",
                   b"lib/modules/virtio_net.ko", b"lib/modules/load-order"):
        assert needed in names
    assert b"virtio_ring\nvirtio\n" in archive
    assert names[-1] == cpio.TRAILER.encode()


@pytest.mark.lab
def test_node_comes_up_with_the_address_of_ip_and_answers_ping(netns, tiny, tmp_path):
    require("qemu-system-x86_64")
    hub = netns.namespace("hub")
    bridge = netns.bridge(hub)
    hub.add_address(bridge, "198.18.0.254/24")
    tap = netns.tap(hub, bridge, "tap0")
    # A hostile vlx.hostname must be ignored as data, not run; the ip= name then counts.
    append = ("ip=198.18.0.11::198.18.0.254:255.255.255.0:node1:eth0:off "
              "vlx.hostname=$(poweroff)")
    qemu, console = boot(hub, tiny, tap, "52:54:00:00:00:11", append, tmp_path / "serial.log",
                         UP_LINE)
    try:
        assert UP_LINE.findall(console) == [("node1", "198.18.0.11")]
        assert "ignoring a bad vlx.hostname" in console
        ping = hub.run(["busybox", "ping", "-c", "1", "-W", "5", "198.18.0.11"], check=False,
                       timeout=20)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        stop(qemu)


@pytest.mark.lab
def test_node_without_ip_takes_address_and_name_from_dhcp(netns, tiny, tmp_path):
    require("qemu-system-x86_64", "dnsmasq")
    leases = tmp_path / "leases"
    with dnsmasq_dhcp(netns, leases, "52:54:00:00:00:12,198.18.0.12,node2") as (hub, tap):
        qemu, console = boot(hub, tiny, tap, "52:54:00:00:00:12", "", tmp_path / "serial.log",
                             UP_LINE)
        try:
            assert UP_LINE.findall(console) == [("node2", "198.18.0.12")]
        finally:
            stop(qemu)


@pytest.mark.lab
def test_build_prints_its_phases_with_elapsed_time_then_reuses_the_cache(tiny, tmp_path, capsys):
    from virtualinux.image import cache
    from virtualinux.vvcm.cli import main

    # A fresh cache that shares the kernel .deb the module's build fetched (no download).
    (tmp_path / "debs").symlink_to(cache.cache_root(None) / "debs")
    assert main(["image", "build", "tiny", "--cache", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    phases = re.findall(r"^\[\s*(\d+\.\d)s\] (\w+):", err, re.MULTILINE)
    assert [name for _, name in phases] == ["kernel", "initramfs", "done"], err
    assert [float(t) for t, _ in phases] == sorted(float(t) for t, _ in phases)
    assert out.strip().startswith(str(tmp_path / "tiny-"))
    assert main(["image", "build", "tiny", "--cache", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\[\s*\d+\.\ds\] cached: tiny [0-9a-f]+\n", err)
    assert main(["image", "show", "tiny", "--cache", str(tmp_path)]) == 0
    assert re.search(r"^  kernel linux-image-\S+ \S+$", capsys.readouterr().out, re.MULTILINE)
