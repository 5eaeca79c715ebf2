"""Rendering the netboot tree for one cluster generation, atomically.

    OUT/current -> gen-7-1a2b3c4d5e6f    what TFTP and HTTP serve (Replica.netboot_root)
    OUT/gen-7-1a2b3c4d5e6f/              one rendered tree (netboot/layout.py lists its files)

A tree is written into a hidden temporary directory, named after its generation and a hash of
its content, and only then does `current` swap to it (rename of a new symlink over the old one),
so a replica never serves a half-written tree. A transfer already running keeps its open file.
Rendering the same inputs twice gives the same bytes and the same directory name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from virtualinux.vvcm import Cluster, VlxError
from virtualinux.vvcm.host import sha256_file

from . import layout, scripts

log = logging.getLogger(__name__)

IPXE_DIR = Path("/usr/lib/ipxe")
DEFAULT_OUT = Path("/var/lib/virtualinux/netboot")
CURRENT = "current"
TREE_PREFIX = "gen-"
KEEP_OLD_TREES = 1      # the previous tree stays for transfers that began before the swap
INITRD_ALIGN = 512      # the node's cpio is appended after the shared initrd (LAB.md)


@dataclasses.dataclass(frozen=True)
class Rendered:
    root: Path          # OUT/gen-N-HASH
    generation: int
    files: tuple[str, ...]
    changed: bool       # False when `current` already pointed at identical content


@dataclasses.dataclass(frozen=True)
class Manifest:
    """netboot.json: what the services need to make per-node files on the fly."""

    generation: int
    kernel_args: tuple[str, ...]
    kernel_sha256: str
    initrd_sha256: str

    def dump(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, tree: Path) -> Manifest:
        data = json.loads((tree / layout.MANIFEST).read_text())
        return cls(generation=int(data["generation"]),
                   kernel_args=scripts.check_kernel_args(data["kernel_args"]),
                   kernel_sha256=str(data["kernel_sha256"]),
                   initrd_sha256=str(data["initrd_sha256"]))


def ipxe_binaries(ipxe_dir: Path = IPXE_DIR) -> dict[str, Path]:
    """Tree name -> Debian's file; arm64 only when the package ships it."""
    found = {name: ipxe_dir / name for name in layout.IPXE_BINARIES}
    missing = [str(path) for path in found.values() if not path.is_file()]
    if missing:
        raise VlxError(f"iPXE binaries missing: {', '.join(missing)} "
                       "(apt-get install ipxe)")
    for arm64 in (ipxe_dir / "arm64-efi" / "ipxe.efi", ipxe_dir / "arm64" / "ipxe.efi"):
        if arm64.is_file():
            found[layout.UEFI_ARM64_BOOTFILE] = arm64
            break
    return found


def boot_image(image_dir: Path) -> tuple[Path, Path]:
    kernel, initrd = image_dir / "vmlinuz", image_dir / "initrd.img"
    for path in (kernel, initrd):
        if not path.is_file():
            raise VlxError(f"{path} is missing: a boot image directory holds vmlinuz and "
                           "initrd.img (vlx image build tiny|node makes one)", str(image_dir))
    return kernel, initrd


def text_files(cluster: Cluster, kernel_args: Sequence[str]) -> dict[str, bytes]:
    """Every file of the tree that is made from the database (scripts, per-node cpios)."""
    files = {layout.IPXE_SCRIPT: scripts.boot_script().encode(),
             layout.DISCOVER_SCRIPT: scripts.discover_script(
                 kernel_args, scripts.files_base(cluster)).encode()}
    for node in cluster.nodes:
        files[layout.node_script_name(node.mac)] = \
            scripts.node_script(cluster, node, kernel_args).encode()
        archive = scripts.node_cpio(cluster, node)
        if archive is not None:
            files[layout.node_cpio_name(node.mac)] = archive
    return files


def render(cluster: Cluster, image_dir: Path, out: Path, kernel_args: Sequence[str] = (),
           ipxe_dir: Path = IPXE_DIR) -> Rendered:
    """Render the tree for `cluster` under `out` and point `out/current` at it."""
    kernel_args = scripts.check_kernel_args(kernel_args)
    kernel, initrd = boot_image(image_dir)
    binaries = ipxe_binaries(ipxe_dir)
    files = text_files(cluster, kernel_args)   # fails on bad database values before any write
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".render-", dir=out))
    try:
        for name, source in binaries.items():
            _copy(source, staging / name)
        _copy(kernel, staging / layout.KERNEL)
        _copy(initrd, staging / layout.INITRD, pad_to=INITRD_ALIGN)
        manifest = Manifest(cluster.generation, kernel_args, sha256_file(staging / layout.KERNEL),
                            sha256_file(staging / layout.INITRD))
        files[layout.MANIFEST] = manifest.dump().encode()
        # 10,000 nodes are 20,000 files: each is written once with its mode and hashed from
        # memory, not read back and chmodded in a second walk of the tree.
        digests = {}
        parents = {staging}
        for name, data in files.items():
            target = staging / name
            if target.parent not in parents:
                target.parent.mkdir(parents=True, exist_ok=True)
                parents.add(target.parent)
            # The per-node cpios hold CHAP secrets: only the service (root) reads them.
            _write(target, data, 0o600 if target.suffix == ".cpio" else 0o644)
            digests[name] = hashlib.sha256(data).hexdigest()
        copied = (*binaries, layout.KERNEL, layout.INITRD)
        names = tuple(sorted({*copied, *files}))
        digest = _tree_digest(staging, names, digests)
        final = out / f"{TREE_PREFIX}{cluster.generation}-{digest[:12]}"
        for directory in parents | {(staging / name).parent for name in copied}:
            directory.chmod(0o755)
        for name in copied:
            (staging / name).chmod(0o644)
        if final.exists():
            shutil.rmtree(staging)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    changed = _swap_current(out, final)
    _prune(out, keep={final.name})
    log.info("netboot tree %s for generation %d (%s)", final.name, cluster.generation,
             "swapped in" if changed else "unchanged")
    return Rendered(final, cluster.generation, names, changed)


def default_out() -> Path:
    """Where trees live unless told: $VLX_NETBOOT or /var/lib/virtualinux/netboot."""
    return Path(os.environ.get("VLX_NETBOOT") or DEFAULT_OUT)


def current_tree(out: Path) -> Path | None:
    link = out / CURRENT
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def _copy(source: Path, target: Path, pad_to: int = 1) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    size = target.stat().st_size
    if size % pad_to:
        # Zeros after a cpio archive are skipped by the kernel's initramfs unpacker.
        os.truncate(target, size + (-size % pad_to))


def _tree_digest(tree: Path, names: Sequence[str], known: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        file_digest = known.get(name) or sha256_file(tree / name)
        digest.update(name.encode() + b"\0" + file_digest.encode() + b"\n")
    return digest.hexdigest()


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, mode)   # exact, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _swap_current(out: Path, tree: Path) -> bool:
    link = out / CURRENT
    if link.is_symlink() and os.readlink(link) == tree.name:
        return False
    temporary = out / f".{CURRENT}-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(tree.name)
    os.replace(temporary, link)
    return True


def _tree_age(tree: Path) -> tuple[int, int]:
    generation = tree.name[len(TREE_PREFIX):].split("-", 1)[0]
    return (int(generation) if generation.isdigit() else -1, tree.stat().st_mtime_ns)


def _prune(out: Path, keep: set[str]) -> None:
    trees = sorted((p for p in out.iterdir() if p.name.startswith(TREE_PREFIX) and p.is_dir()
                    and p.name not in keep), key=_tree_age, reverse=True)
    for old in trees[KEEP_OLD_TREES:]:
        shutil.rmtree(old, ignore_errors=True)
