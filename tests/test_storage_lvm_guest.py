"""The lvm-thin backend's commands against real LVM and dm-thin, inside a QEMU guest.

device-mapper is absent on the lab hosts (LAB.md), so the commands `storage.lvm_thin` builds
are rendered into a script that a throw-away guest (Debian's cloud kernel, busybox, the host's
own `lvm` binary with its libraries) runs against a virtio disk: a thin golden volume, thin
snapshots of it, a write to one, grow, remove. The guest prints what it saw; we check it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from virtualinux.storage import lvm_thin

from .conftest import require

pytestmark = pytest.mark.lab

MIB = 1 << 20
VG, POOL, GOLDEN = "san", "thin", "node"
SNAPSHOTS = ("node1-root", "node2-root", "node3-root")
DEB_CACHE = Path("/var/cache/virtualinux/images/debs")
MODULES = ["virtio_ring", "virtio", "virtio_pci", "virtio_blk", "dm_mod", "dm_snapshot",
           "dm_thin_pool"]
LVM_CONF = """\
global { thin_check_executable = "" }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
devices { obtain_device_list_from_udev = 0 }
"""


def guest_script() -> str:
    """What the guest runs: our commands, with markers around what we read back."""
    def run(cmd: list[str]) -> str:
        return shlex.join(cmd)

    lines = [
        "set -e",
        f"lvm pvcreate -q /dev/vda && lvm vgcreate -q {VG} /dev/vda",
        f"lvm lvcreate -q --yes --type thin-pool -L 256m -n {POOL} {VG}",
        run(lvm_thin.create_thin_command(VG, POOL, GOLDEN, 32 * MIB)),
        f"dd if=/dev/urandom of=/dev/{VG}/{GOLDEN} bs=1M count=32 2>/dev/null",
        run(lvm_thin.readonly_command(VG, GOLDEN)),
        *(run(lvm_thin.snapshot_command(VG, GOLDEN, name)) for name in SNAPSHOTS),
        f"dd if=/dev/zero of=/dev/{VG}/{SNAPSHOTS[0]} bs=1M seek=4 count=1 conv=fsync "
        "2>/dev/null",
        "echo @@sums",
        f"md5sum /dev/{VG}/{GOLDEN} " + " ".join(f"/dev/{VG}/{n}" for n in SNAPSHOTS),
        "echo @@golden-attr",
        run(lvm_thin.report_command(VG, GOLDEN, ["lv_attr", "pool_lv", "lv_size"])),
        "echo @@snapshot-attr",
        run(lvm_thin.report_command(VG, SNAPSHOTS[1], ["lv_attr", "pool_lv", "origin"])),
        "echo @@pool",
        run(lvm_thin.report_command(VG, POOL, ["data_percent", "metadata_percent"])),
        run(lvm_thin.grow_command(VG, SNAPSHOTS[1], 64 * MIB)),
        "echo @@grown",
        f"blockdev --getsize64 /dev/{VG}/{SNAPSHOTS[1]}",
        "echo @@remove",
        run(lvm_thin.remove_command(VG, SNAPSHOTS[2])),
        "echo @@left",
        f"ls /dev/{VG}",
        "echo @@done",
    ]
    return "\n".join(lines) + "\n"


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
for tool in lvcreate lvchange lvremove lvextend lvs; do ln -s /sbin/lvm /sbin/$tool; done
sh /test.sh 2>&1 || echo "@@failed $?"
poweroff -f
"""


def build_initramfs(work: Path, vmlinuz_root: Path, package) -> Path:
    from virtualinux.image import kernel

    root = work / "initramfs"
    (root / "bin").mkdir(parents=True)
    (root / "sbin").mkdir()
    (root / "modules").mkdir()
    (root / "etc" / "lvm").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    lvm = Path(shutil.which("lvm"))
    shutil.copy(lvm, root / "sbin" / "lvm")
    for line in subprocess.run(["ldd", str(lvm)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            library = Path(match.group(1))
            target = root / library.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(library, target)
    order = []
    for name, elf in kernel.modules_in_load_order(vmlinuz_root, package, MODULES):
        (root / "modules" / f"{name}.ko").write_bytes(elf)
        order.append(name)
    (root / "modules.order").write_text("\n".join(order) + "\n")
    (root / "etc" / "lvm" / "lvm.conf").write_text(LVM_CONF)
    (root / "test.sh").write_text(guest_script())
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    image = work / "initrd.cpio"
    with open(image, "wb") as out:
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                       stdout=out, check=True)
    return image


def sections(console: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in console.replace("\r", "").splitlines():
        if line.startswith("@@"):
            current = line[2:].strip()
            out[current] = []
        elif current is not None and line.strip():
            out[current].append(line.strip())
    return out


def test_lvm_thin_commands_make_thin_snapshots_on_real_dm_thin(tmp_path):
    require("qemu-system-x86_64", "lvm", "cpio", "busybox")
    from virtualinux.image import kernel

    try:
        package = kernel.candidate()
        deb = kernel.fetch(package, DEB_CACHE)
    except Exception as err:  # no apt lists or no archive: say so, do not pretend
        pytest.skip(f"lvm-thin guest test: cannot get Debian's cloud kernel ({err})")
    unpacked = tmp_path / "kernel"
    kernel.unpack(deb, unpacked)
    initrd = build_initramfs(tmp_path, unpacked, package)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate(512 * MIB)
    result = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
         "-nodefaults", "-serial", "stdio", "-kernel", str(kernel.vmlinuz(unpacked, package)),
         "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 quiet",
         "-drive", f"file={disk},if=virtio,format=raw"],
        capture_output=True, text=True, timeout=240)
    console = result.stdout
    found = sections(console)
    assert "done" in found, console[-3000:]
    sums = dict(reversed(line.split()) for line in found["sums"])
    golden = sums[f"/dev/{VG}/{GOLDEN}"]
    assert sums[f"/dev/{VG}/{SNAPSHOTS[1]}"] == golden
    assert sums[f"/dev/{VG}/{SNAPSHOTS[2]}"] == golden
    assert sums[f"/dev/{VG}/{SNAPSHOTS[0]}"] != golden  # written: only it changed

    attr, pool, size = found["golden-attr"][0].split("|")
    assert attr.startswith("Vr") and pool == POOL and int(size) == 32 * MIB  # thin, read-only
    attr, pool, origin = found["snapshot-attr"][0].split("|")
    assert attr.startswith("Vw") and attr[4] == "a" and pool == POOL and origin == GOLDEN
    data, _meta = (float(v) for v in found["pool"][0].split("|"))
    # Three snapshots of a 32 MiB golden plus one 1 MiB write: the pool holds ~one golden.
    assert data * 256 / 100 < 40, found["pool"]
    assert found["grown"] == [str(64 * MIB)]
    assert found["remove"] == [f'Logical volume "{SNAPSHOTS[2]}" successfully removed.']
    assert sorted(found["left"][0].split()) == sorted([GOLDEN, *SNAPSHOTS[:2]])
