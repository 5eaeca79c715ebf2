"""The tiny lab image: Debian's cloud kernel and a busybox initramfs of our own, booted by lab
and QEMU tests that need a machine which comes up on the network in seconds (no DIB build).

`build_tiny()` returns a directory with `vmlinuz`, `initrd.img` and `manifest.json`. The
initramfs holds busybox (from the host's busybox-static), the virtio modules of that same
kernel in load order, and `/init` (tiny-init.sh): it configures eth0 from `ip=` or by DHCP and
prints `virtualinux: node NAME up IP` on the console. Builds are cached by input hash
(cache.py), so only the first call on a machine takes a few seconds.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import time
from pathlib import Path

from virtualinux.netboot import cpio

from ..vvcm.errors import VlxError
from . import cache, kernel
from .dib import Clock, Progress

KIND = "tiny"
# virtio_ring before virtio, then the PCI transport and the devices; kernel.py adds whatever
# else these depend on (virtio_pci_modern_dev, failover, net_failover, ...) in front of them.
MODULES = ["virtio_ring", "virtio", "virtio_pci", "virtio_net", "virtio_blk"]
BUSYBOX = Path("/bin/busybox")
HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "tiny-init.sh"
UDHCPC_SCRIPT = HERE / "tiny-udhcpc.sh"
# The code that decides the output: a change to any of it is a new image.
BUILDER_SOURCES = [Path(__file__).resolve(), Path(cpio.__file__).resolve(), HERE / "kernel.py",
                   INIT_SCRIPT, UDHCPC_SCRIPT]


def _busybox() -> Path:
    if not BUSYBOX.is_file():
        raise VlxError(f"{BUSYBOX} is missing: install busybox-static", "image tiny")
    # Debian's dynamic busybox would need its libraries in the initramfs.
    if b"/lib64/ld-linux" in BUSYBOX.read_bytes()[:4096]:
        raise VlxError(f"{BUSYBOX} is dynamically linked: install busybox-static",
                       "image tiny")
    return BUSYBOX


def tiny_inputs(package: kernel.KernelPackage) -> dict[str, str]:
    inputs = {"kernel": f"{package.name}={package.version}",
              "busybox": cache.sha256_file(_busybox()),
              "modules": ",".join(MODULES)}
    for source in BUILDER_SOURCES:
        inputs[f"source:{source.name}"] = cache.sha256_file(source)
    return inputs


def _applets(busybox: Path) -> list[str]:
    listing = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True).stdout
    return sorted(name for name in listing.split() if name and "/" not in name)


def initramfs_entries(busybox: Path, modules: list[tuple[str, bytes]]) -> list[cpio.Entry]:
    entries = [cpio.directory(name) for name in
               ("bin", "dev", "etc", "lib", "lib/modules", "proc", "run", "sys", "tmp")]
    entries += [cpio.char_device("dev/console", 5, 1), cpio.char_device("dev/null", 1, 3, 0o666),
                cpio.regular("bin/busybox", busybox.read_bytes(), 0o755)]
    entries += [cpio.symlink(f"bin/{applet}", "busybox") for applet in _applets(busybox)
                if applet != "busybox"]
    entries.append(cpio.symlink("sbin", "bin"))
    entries += [cpio.regular(f"lib/modules/{name}.ko", elf) for name, elf in modules]
    load_order = "".join(f"{name}\n" for name, _ in modules).encode()
    entries.append(cpio.regular("lib/modules/load-order", load_order))
    entries.append(cpio.regular("etc/udhcpc.script", UDHCPC_SCRIPT.read_bytes(), 0o755))
    entries.append(cpio.regular("init", INIT_SCRIPT.read_bytes(), 0o755))
    return entries


def _build(staged: Path, root: Path, package: kernel.KernelPackage,
           inputs: dict[str, str], key: str, clock: Clock) -> None:
    started = time.monotonic()
    clock.say(f"kernel: {package.name} {package.version}")
    deb = kernel.fetch(package, root / "debs")
    unpacked = staged / "kernel-package"
    kernel.unpack(deb, unpacked)
    modules = kernel.modules_in_load_order(unpacked, package, MODULES)
    shutil.copyfile(kernel.vmlinuz(unpacked, package), staged / "vmlinuz")
    clock.say(f"initramfs: busybox, {len(modules)} modules ({', '.join(n for n, _ in modules)})")
    archive = cpio.archive(initramfs_entries(_busybox(), modules))
    # mtime=0: the same inputs give the same initrd bytes.
    (staged / "initrd.img").write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))
    shutil.rmtree(unpacked)
    cache.write_manifest(staged, {
        "kind": KIND, "key": key, "inputs": inputs,
        "kernel": {"package": package.name, "version": package.version,
                   "release": package.release},
        "modules": [name for name, _ in modules],
        "artifacts": {name: {"size": (staged / name).stat().st_size,
                             "sha256": cache.sha256_file(staged / name)}
                      for name in ("vmlinuz", "initrd.img")},
        "build_seconds": round(time.monotonic() - started, 2),
    })


def build_tiny(out_dir: Path | None = None, cache_dir: Path | None = None,
               package: kernel.KernelPackage | None = None,
               progress: Progress | None = None) -> Path:
    """A directory holding `vmlinuz` and `initrd.img` (and `manifest.json`): the cache entry
    itself (treat it as read-only), or `out_dir` with copies of the files when given.
    `progress` hears each phase with the time elapsed (`vlx image build tiny` prints them)."""
    clock = Clock(progress or (lambda message: None))
    root = cache.cache_root(cache_dir)
    package = package or kernel.candidate()
    inputs = tiny_inputs(package)
    key = cache.input_key(inputs)
    entry = cache.cached(root, KIND, key)
    if entry is None:
        with cache.build_lock(root, KIND, key):
            entry = cache.cached(root, KIND, key)   # built by whoever held the lock
            if entry is None:
                with cache.staging(root, KIND) as staged:
                    _build(staged, root, package, inputs, key, clock)
                    entry = cache.publish(staged, cache.entry_dir(root, KIND, key))
                clock.say(f"done: {entry}")
                return cache.deliver(entry, out_dir) if out_dir is not None else entry
    clock.say(f"cached: {KIND} {key}")
    return cache.deliver(entry, out_dir) if out_dir is not None else entry
