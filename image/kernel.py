"""Debian's cloud kernel, taken from Debian's archive as a package and unpacked, never installed
on the host: the kernel image and the modules an initramfs needs, in the order they must load.

The package is the one `linux-image-cloud-amd64` depends on in the host's apt lists (bookworm:
`linux-image-6.1.0-N-cloud-amd64`); `apt-get download` fetches it into a cache directory and
`dpkg-deb -x` unpacks it. Debian ships no modules.dep inside the package (depmod runs at
install), so module dependencies are read from each module's own `.modinfo` section.
"""

from __future__ import annotations

import dataclasses
import lzma
import re
import shutil
import subprocess
from pathlib import Path

from ..vvcm.errors import VlxError

META_PACKAGE = "linux-image-cloud-amd64"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    name: str      # linux-image-6.1.0-56-cloud-amd64
    version: str   # 6.1.192-2

    @property
    def release(self) -> str:
        """The kernel release (`uname -r`): the package name without `linux-image-`."""
        return self.name.removeprefix("linux-image-")


def _apt(*args: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError as err:
        raise VlxError(f"{args[0]} is not installed", "image kernel") from err
    except subprocess.CalledProcessError as err:
        raise VlxError(f"`{' '.join(args)}` failed: {err.stderr.strip()[-400:]}",
                       "image kernel") from err
    return done.stdout


def candidate(meta_package: str = META_PACKAGE) -> KernelPackage:
    """The kernel package the meta package points at now. apt's lists may be missing (a new
    machine whose packages were all installed already) or old (the archive has moved on to a
    newer kernel and dropped the one they name): then they are refreshed once and asked again."""
    try:
        return _candidate(meta_package)
    except VlxError:
        _apt("apt-get", "update", "-qq")
        return _candidate(meta_package)


def _candidate(meta_package: str) -> KernelPackage:
    depends = _apt("apt-cache", "depends", "--important", meta_package)
    names = re.findall(r"^\s*Depends:\s*(linux-image-\S+)$", depends, re.MULTILINE)
    if not names:
        raise VlxError(f"{meta_package} names no kernel package in apt's lists "
                       "(run `apt-get update`)", "image kernel")
    name = names[0]
    policy = _apt("apt-cache", "policy", name)
    match = re.search(r"^\s*Candidate:\s*(\S+)$", policy, re.MULTILINE)
    if not match or match.group(1) == "(none)":
        raise VlxError(f"{name} has no candidate version in apt's lists", "image kernel")
    return KernelPackage(name, match.group(1))


def fetch(package: KernelPackage, deb_dir: Path) -> Path:
    """The package's .deb in `deb_dir`, downloaded from the archive unless it is there."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    # apt names files with the epoch's ":" escaped as "%3a".
    filename = f"{package.name}_{package.version.replace(':', '%3a')}_amd64.deb"
    deb = deb_dir / filename
    if not deb.exists():
        try:
            _apt("apt-get", "download", "-q", f"{package.name}={package.version}", cwd=deb_dir)
        except VlxError:
            _apt("apt-get", "update", "-qq")
            _apt("apt-get", "download", "-q", f"{package.name}={package.version}", cwd=deb_dir)
        if not deb.exists():
            raise VlxError(f"apt-get download gave no {filename}", "image kernel")
    return deb


def unpack(deb: Path, into: Path) -> None:
    _apt("dpkg-deb", "-x", str(deb), str(into))


def vmlinuz(root: Path, package: KernelPackage) -> Path:
    path = root / "boot" / f"vmlinuz-{package.release}"
    if not path.is_file():
        raise VlxError(f"{path.name} is not in {package.name}", "image kernel")
    return path


def _module_files(root: Path, package: KernelPackage) -> dict[str, Path]:
    """Every module of the package by its name (file stem with "-" read as "_")."""
    modules: dict[str, Path] = {}
    for path in (root / "lib" / "modules" / package.release).rglob("*.ko*"):
        for suffix in MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                modules[path.name.removesuffix(suffix).replace("-", "_")] = path
    return modules


def module_bytes(path: Path) -> bytes:
    """The plain ELF of a module; busybox insmod cannot read the compressed forms."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise VlxError(f"{path.name} is zstd-compressed and zstd is not installed",
                           "image kernel")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    return data


def module_depends(elf: bytes) -> list[str]:
    match = _DEPENDS.search(elf)
    if not match or not match.group(1):
        return []
    return [name.decode().replace("-", "_") for name in match.group(1).split(b",")]


def modules_in_load_order(root: Path, package: KernelPackage,
                          wanted: list[str]) -> list[tuple[str, bytes]]:
    """(name, plain ELF) of `wanted` and everything they depend on, each after its
    dependencies, in the order asked for otherwise (virtio_ring before virtio, ...)."""
    files = _module_files(root, package)
    ordered: list[tuple[str, bytes]] = []
    placed: set[str] = set()

    def place(name: str, chain: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in chain:
            raise VlxError(f"module dependency loop: {' -> '.join(chain + (name,))}",
                           "image kernel")
        if name not in files:
            raise VlxError(f"module {name} is not in {package.name} (built in, or misspelt?)",
                           "image kernel")
        elf = module_bytes(files[name])
        for dependency in module_depends(elf):
            place(dependency, chain + (name,))
        placed.add(name)
        ordered.append((name, elf))

    for name in wanted:
        place(name, ())
    return ordered
