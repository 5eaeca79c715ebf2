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
from collections.abc import Iterable, Sequence
from pathlib import Path

from virtualinux.vvcm import Cluster, VlxError

from . import layout, scripts

log = logging.getLogger(__name__)

IPXE_DIR = Path("/usr/lib/ipxe")
DEFAULT_OUT = Path("/var/lib/virtualinux/netboot")
CURRENT = "current"
TREE_PREFIX = "gen-"
KEEP_OLD_TREES = 1      # the previous tree stays for transfers that began before the swap
INITRD_ALIGN = 512      # the node's cpio is appended after the shared initrd (LAB.md)
SOURCES_MEMO = ".sources.json"
COPY_BLOCK = 1 << 20


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
    """Render the tree for `cluster` under `out` and point `out/current` at it. Files copied
    from elsewhere (iPXE, kernel, initrd) are read once, hashed as they are copied; when their
    digests are known from an earlier render (SOURCES_MEMO) and the tree exists, nothing is
    copied at all (a node renders at every boot, on a root reached over iSCSI)."""
    kernel_args = scripts.check_kernel_args(kernel_args)
    kernel, initrd = boot_image(image_dir)
    sources = {**{name: (path, 1) for name, path in ipxe_binaries(ipxe_dir).items()},
               layout.KERNEL: (kernel, 1), layout.INITRD: (initrd, INITRD_ALIGN)}
    files = text_files(cluster, kernel_args)   # fails on bad database values before any write
    out.mkdir(parents=True, exist_ok=True)
    known = _memo_digests(out, sources)
    if len(known) == len(sources):
        files[layout.MANIFEST] = _manifest(cluster, kernel_args, known)
        final = out / _tree_name(cluster.generation, files, known)
        if final.is_dir():
            return _swapped_in(out, final, cluster.generation, (*sources, *files))
    # Taken before the copies: a source written meanwhile has another ctime when it is next
    # looked at, so the digest of what was copied is never trusted for what is there now.
    stats = {name: _source_stat(path, pad_to) for name, (path, pad_to) in sources.items()}
    staging = Path(tempfile.mkdtemp(prefix=".render-", dir=out))
    try:
        copied = {name: _copy(path, staging / name, pad_to)
                  for name, (path, pad_to) in sources.items()}
        _save_memo(out, stats, copied)
        files[layout.MANIFEST] = _manifest(cluster, kernel_args, copied)
        final = out / _tree_name(cluster.generation, files, copied)
        parents = {staging}
        # 10,000 nodes are 20,000 files: each is written once with its mode, not chmodded in a
        # second walk of the tree.
        for name, data in files.items():
            target = staging / name
            if target.parent not in parents:
                target.parent.mkdir(parents=True, exist_ok=True)
                parents.add(target.parent)
            # The per-node cpios hold CHAP secrets: only the service (root) reads them.
            _write(target, data, 0o600 if target.suffix == ".cpio" else 0o644)
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
    return _swapped_in(out, final, cluster.generation, (*sources, *files))


def _manifest(cluster: Cluster, kernel_args: tuple[str, ...], copied: dict[str, str]) -> bytes:
    return Manifest(cluster.generation, kernel_args, copied[layout.KERNEL],
                    copied[layout.INITRD]).dump().encode()


def _tree_name(generation: int, files: dict[str, bytes], copied: dict[str, str]) -> str:
    """The tree's directory name, from its generation and the digest of every file: the
    copied ones' `copied` digests and the made ones' bytes."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    digests.update(copied)
    tree = hashlib.sha256()
    for name in sorted(digests):
        tree.update(name.encode() + b"\0" + digests[name].encode() + b"\n")
    return f"{TREE_PREFIX}{generation}-{tree.hexdigest()[:12]}"


def _swapped_in(out: Path, final: Path, generation: int, names: Iterable[str]) -> Rendered:
    changed = _swap_current(out, final)
    _prune(out, keep={final.name})
    log.info("netboot tree %s for generation %d (%s)", final.name, generation,
             "swapped in" if changed else "unchanged")
    return Rendered(final, generation, tuple(sorted(set(names))), changed)


def default_out() -> Path:
    """Where trees live unless told: $VLX_NETBOOT or /var/lib/virtualinux/netboot."""
    return Path(os.environ.get("VLX_NETBOOT") or DEFAULT_OUT)


def current_tree(out: Path) -> Path | None:
    link = out / CURRENT
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def _copy(source: Path, target: Path, pad_to: int = 1) -> str:
    """Copy `source` to `target`, padded with zeros to a multiple of `pad_to` (zeros after a
    cpio archive are skipped by the kernel's initramfs unpacker): the copy's SHA-256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while block := reader.read(COPY_BLOCK):
            digest.update(block)
            writer.write(block)
            size += len(block)
        padding = bytes(-size % pad_to)
        digest.update(padding)
        writer.write(padding)
    return digest.hexdigest()


def _source_stat(path: Path, pad_to: int) -> list[object]:
    """What says a source file is the one an earlier render hashed: where it is, its size,
    times and inode (any write changes ctime, which nobody can set back), and the padding."""
    st = os.stat(path)
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, pad_to]


def _memo_digests(out: Path, sources: dict[str, tuple[Path, int]]) -> dict[str, str]:
    """The digests of the sources that have not changed since the memo was written."""
    try:
        memo = json.loads((out / SOURCES_MEMO).read_text())
        return {name: str(memo[name]["sha256"]) for name, (path, pad_to) in sources.items()
                if name in memo and memo[name]["stat"] == _source_stat(path, pad_to)}
    except (OSError, ValueError, TypeError, KeyError):
        return {}       # no memo, or not one we wrote: hash again


def _save_memo(out: Path, stats: dict[str, list[object]], digests: dict[str, str]) -> None:
    memo = {name: {"stat": stat, "sha256": digests[name]} for name, stat in stats.items()}
    partial = out / f"{SOURCES_MEMO}.{os.getpid()}"
    partial.write_text(json.dumps(memo, indent=1, sort_keys=True) + "\n")
    os.replace(partial, out / SOURCES_MEMO)


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
