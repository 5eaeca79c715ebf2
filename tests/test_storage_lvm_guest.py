"""The lvm-thin backend's commands against real LVM and dm-thin, inside a QEMU guest.

device-mapper is absent on the lab hosts (LAB.md), so the commands `storage.lvm_thin` builds
are rendered into a script that a throw-away guest (Debian's cloud kernel, busybox, the host's
own `lvm` binary with its libraries) runs against a virtio disk: a thin golden volume, thin
snapshots of it, a write to one, grow, remove. The guest prints what it saw; we check it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from virtualinux.storage import lvm_thin

from .conftest import ROOT, require

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
export PATH=/sbin:/bin:/usr/bin PYTHONPATH=/pylib PYTHONDONTWRITEBYTECODE=1 USER=root
export PYTHONHASHSEED=0  # no wait for the guest's entropy at interpreter start
sh /test.sh 2>&1 || echo "@@failed $?"
poweroff -f
"""


def copy_with_libraries(binary: Path, root: Path) -> None:
    """`binary` and every shared library `ldd` says it needs, at the same paths under root."""
    target = root / binary.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(binary, target)
    for line in subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            library = Path(match.group(1))
            target = root / library.relative_to("/")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(library, target)


def add_python(root: Path) -> None:
    """Debian's python3.11 with its standard library, and our vvcm and storage packages, so
    the guest runs the lvm-thin backend itself."""
    copy_with_libraries(Path("/usr/bin/python3.11"), root)
    stdlib = Path("/usr/lib/python3.11")
    skip = shutil.ignore_patterns("test", "tests", "idlelib", "tkinter", "ensurepip",
                                  "lib2to3", "pydoc_data", "__pycache__", "site-packages",
                                  "dist-packages", "_test*.so", "_ctypes_test*.so")
    shutil.copytree(stdlib, root / stdlib.relative_to("/"), ignore=skip, symlinks=True)
    for module in (stdlib / "lib-dynload").glob("_sqlite3*.so"):
        copy_with_libraries(module, root)
    package = root / "pylib" / "virtualinux"
    for area in ("vvcm", "storage"):
        shutil.copytree(ROOT / area, package / area, ignore=shutil.ignore_patterns(
            "__pycache__", "cli"))
    (package / "vvcm" / "cli").mkdir()
    (package / "vvcm" / "cli" / "__init__.py").write_text("")


def build_initramfs(work: Path, vmlinuz_root: Path, package, script: str,
                    python: bool = False) -> Path:
    from virtualinux.image import kernel

    root = work / "initramfs"
    (root / "bin").mkdir(parents=True)
    (root / "sbin").mkdir()
    (root / "modules").mkdir()
    (root / "etc" / "lvm").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    copy_with_libraries(Path(shutil.which("lvm")).resolve(), root)
    shutil.copy(Path(shutil.which("lvm")).resolve(), root / "sbin" / "lvm")
    if python:
        add_python(root)
    order = []
    for name, elf in kernel.modules_in_load_order(vmlinuz_root, package, MODULES):
        (root / "modules" / f"{name}.ko").write_bytes(elf)
        order.append(name)
    (root / "modules.order").write_text("\n".join(order) + "\n")
    (root / "etc" / "lvm" / "lvm.conf").write_text(LVM_CONF)
    (root / "test.sh").write_text(script)
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


def run_guest(tmp_path: Path, script: str, python: bool = False) -> str:
    """Boot a throw-away guest that runs `script` against a 512 MiB virtio disk; its console."""
    require("qemu-system-x86_64", "lvm", "cpio", "busybox", "python3.11")
    from virtualinux.image import kernel

    try:
        package = kernel.candidate()
        deb = kernel.fetch(package, DEB_CACHE)
    except Exception as err:  # no apt lists or no archive: say so, do not pretend
        pytest.skip(f"lvm-thin guest test: cannot get Debian's cloud kernel ({err})")
    unpacked = tmp_path / "kernel"
    kernel.unpack(deb, unpacked)
    initrd = build_initramfs(tmp_path, unpacked, package, script, python)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate(512 * MIB)
    result = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "768", "-nographic", "-no-reboot",
         "-nodefaults", "-serial", "stdio", "-kernel", str(kernel.vmlinuz(unpacked, package)),
         "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 quiet",
         "-drive", f"file={disk},if=virtio,format=raw"],
        capture_output=True, text=True, timeout=240)
    return result.stdout


def test_lvm_thin_commands_make_thin_snapshots_on_real_dm_thin(tmp_path):
    console = run_guest(tmp_path, guest_script())
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


BACKEND_TEST = """
import json, os, random, ipaddress
from pathlib import Path
from virtualinux.vvcm import changes
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import Node, Settings
from virtualinux.storage import volumes

MIB = 1 << 20
db = Database.create("/tmp/cluster.db")
settings = Settings(name="vlxlab", domain="cluster.lab",
                    cidr=ipaddress.ip_network("198.18.0.0/24"),
                    gateway_vip=ipaddress.ip_address("198.18.0.254"))
def setup(cluster):
    cluster = changes.set_settings(cluster, settings)
    for i in (1, 2, 3):
        cluster = changes.add_node(cluster, Node(
            name=f"node{i}", mac=f"52:54:00:00:00:1{i}",
            ip=ipaddress.ip_address(f"198.18.0.1{i}"), cpus=1, memory=1024))
    return cluster
db.update("setup", "guest", setup)
data = random.Random(7).randbytes(8 * MIB) + bytes(8 * MIB)
Path("/tmp/golden.raw").write_bytes(data)
def read(path):
    with open(path, "rb") as disk:
        return disk.read(len(data))
def size(path):
    with open(path, "rb") as disk:
        return disk.seek(0, 2)
out = {}
golden = volumes.add_golden(db, "node", Path("/tmp/golden.raw"), "lvm-thin", "san/thin")
out["golden"] = [golden.path, golden.size, read(golden.path) == data]
made = volumes.snapshot_volumes(db, "node", count=3)
out["snapshots"] = [[v.name, v.path, v.origin, v.owner, read(v.path) == data] for v in made]
with open(made[0].path, "r+b") as disk:
    disk.seek(MIB)
    disk.write(bytes([0x5A]) * MIB)
    disk.flush()
    os.fsync(disk.fileno())
out["unchanged"] = [read(path) == data for path in (golden.path, made[1].path, made[2].path)]
out["written"] = read(made[0].path)[MIB:2 * MIB] == bytes([0x5A]) * MIB
for fault, call in [
        ("clash", lambda: volumes.snapshot_volumes(db, "node", owners="node1")),
        ("in_use", lambda: volumes.snapshot_volumes(db, "node", owners="node2",
                                                    suffix="extra"))]:
    try:
        if fault == "in_use":
            with open(golden.path, "rb"):
                call()
        else:
            call()
        out[fault] = "not refused"
    except VlxError as err:
        out[fault] = str(err)
out["grown"] = [volumes.grow(db, "node2-root", 32 * MIB).size, size("/dev/san/node2-root")]
volumes.remove(db, ["node3-root"])
out["left"] = sorted(os.listdir("/dev/san"))
out["db"] = sorted(v.name for v in db.load().volumes)
print("@@json")
print(json.dumps(out))
"""


def test_lvm_thin_backend_in_a_guest_with_dm_thin(tmp_path):
    """The backend class itself (Python in the guest): golden from an image, thin snapshots
    recorded in the database, writes kept apart, clash and in-use refused, grow, remove."""
    script = "\n".join([
        f"lvm pvcreate -q /dev/vda && lvm vgcreate -q {VG} /dev/vda",
        f"lvm lvcreate -q --yes --type thin-pool -L 256m -n {POOL} {VG}",
        "cat > /tmp/backend_test.py <<'PYTHON'",
        BACKEND_TEST,
        "PYTHON",
        "python3.11 /tmp/backend_test.py",
        "echo @@done",
    ]) + "\n"
    console = run_guest(tmp_path, script, python=True)
    found = sections(console)
    assert "json" in found and "done" in found, console[-3000:]
    result = json.loads(found["json"][0])
    assert result["golden"] == [f"/dev/{VG}/node", 16 * MIB, True]
    assert result["snapshots"] == [[f"node{i}-root", f"/dev/{VG}/node{i}-root", "node",
                                    f"node{i}", True] for i in (1, 2, 3)]
    assert result["unchanged"] == [True, True, True] and result["written"] is True
    assert "a volume named node1-root exists already" in result["clash"]
    assert "in use read-write" in result["in_use"] and "LVM cannot say how" in result["in_use"]
    assert result["grown"] == [32 * MIB, 32 * MIB]
    assert result["left"] == ["node", "node1-root", "node2-root"]
    assert result["db"] == ["node", "node1-root", "node2-root"]
