"""The image cache: where built images live, the input hash that names them, and how a finished
build is published and handed out without ever exposing a half-written artifact.

A build's key is the SHA-256 of everything that decides its output (elements, scripts, release,
mirrors, package versions, the builder's own code). An entry is `ROOT/KIND-KEY/` holding the
artifacts and `manifest.json`; it appears by one rename of a finished temporary directory, so
an entry that exists is complete. The root is `--cache`, else `$VLX_IMAGE_CACHE`, else
/var/cache/virtualinux/images; it survives across runs on purpose, but not without bound: each
change to the node's sources is a new node image of about a gigabyte, so publishing one retires
the least recently used entries of its kind beyond `keep_count()` (`$VLX_IMAGE_CACHE_KEEP`, 3).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..vvcm.errors import VlxError
from ..vvcm.host import sha256_file  # noqa: F401  (image code calls cache.sha256_file)

DEFAULT_ROOT = Path("/var/cache/virtualinux/images")
MANIFEST = "manifest.json"
DEFAULT_KEEP = 3


def cache_root(override: Path | None = None) -> Path:
    root = override or Path(os.environ.get("VLX_IMAGE_CACHE") or DEFAULT_ROOT)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VlxError(f"cannot create the image cache {root}: {err.strerror} "
                       "(give --cache DIR or set VLX_IMAGE_CACHE)", "image cache") from err
    return root


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_tree(root: Path) -> str:
    """One hash of a directory: every file's relative path, executable bit and contents, and
    every symlink's target, in sorted order (so a rename or a chmod +x changes the key too)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.name == "__pycache__" or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"L {relative} {os.readlink(path)}\n".encode())
        elif path.is_file():
            executable = "x" if os.access(path, os.X_OK) else "-"
            digest.update(f"F {relative} {executable} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def input_key(inputs: Mapping[str, str]) -> str:
    """The cache key of a build from its named input hashes/values; order does not matter."""
    canonical = json.dumps(dict(sorted(inputs.items())), separators=(",", ":"))
    return sha256_bytes(canonical.encode())[:16]


def entry_dir(root: Path, kind: str, key: str) -> Path:
    return root / f"{kind}-{key}"


def lock_file(entry: Path) -> Path:
    """What a build of `entry` holds (flock) while it runs, and a prune takes before it."""
    return entry.with_name(f".{entry.name}.lock")


def cached(root: Path, kind: str, key: str) -> Path | None:
    """The entry for (kind, key) if a finished build published it, marked as just used (its
    directory's mtime: what `prune` keeps the most recent of)."""
    entry = entry_dir(root, kind, key)
    if not (entry / MANIFEST).is_file():
        return None
    with contextlib.suppress(OSError):     # a read-only cache is still a cache
        os.utime(entry)
    return entry


@contextlib.contextmanager
def build_lock(root: Path, kind: str, key: str,
               waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Two builds of the same key wait for each other instead of racing on one entry.
    `waiting` is called once if another holder makes us wait."""
    with lock_file(entry_dir(root, kind, key)).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging(root: Path, kind: str) -> Iterator[Path]:
    """A temporary directory inside the cache (same file system, so publishing is a rename),
    removed afterwards whatever happened."""
    path = Path(tempfile.mkdtemp(prefix=f".{kind}-building-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_manifest(directory: Path, manifest: Mapping[str, object]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def publish(staged: Path, entry: Path) -> Path:
    """Move a finished build into place in one rename, then retire what it makes surplus."""
    staged.chmod(0o755)     # mkdtemp made it private; the images are for every user to read
    staged.rename(entry)
    os.utime(entry)         # the newest used: its build may have begun before others' last hits
    prune(entry.parent, read_manifest(entry)["kind"], keep_count())
    return entry


def keep_count() -> int:
    """How many entries of each kind the cache keeps: `$VLX_IMAGE_CACHE_KEEP`, else 3."""
    text = os.environ.get("VLX_IMAGE_CACHE_KEEP", "")
    if not text:
        return DEFAULT_KEEP
    if not text.isdigit() or int(text) < 1:
        raise VlxError(f"VLX_IMAGE_CACHE_KEEP={text!r} is not a whole number of at least 1",
                       "image cache")
    return int(text)


def prune(root: Path, kind: str, keep: int) -> list[Path]:
    """Retire the entries of `kind` beyond the `keep` most recently used; the ones retired.
    An entry whose build lock someone holds (a rebuild of it) is left alone."""
    found = [entry for entry, manifest in entries(root) if manifest.get("kind") == kind]
    found.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
    retired = []
    for entry in found[keep:]:
        with lock_file(entry).open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            try:
                retire(entry)
            except FileNotFoundError:
                continue            # another prune took it first
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        for log in (root / "logs").glob(f"{entry.name}-*.log"):
            log.unlink(missing_ok=True)
        retired.append(entry)
    return retired


def deliver(entry: Path, out_dir: Path) -> Path:
    """Copy an entry's files into `out_dir` (reflinked where the file system can), each through
    a temporary name and a rename, so `out_dir` never holds a half-copied artifact."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VlxError(f"cannot create {out_dir}: {err.strerror}", "image output") from err
    for source in sorted(entry.iterdir()):
        if not source.is_file():
            continue
        target = out_dir / source.name
        partial = out_dir / f".{source.name}.partial"
        done = subprocess.run(["cp", "--reflink=auto", "--", str(source), str(partial)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise VlxError(f"copying {source.name} to {out_dir} failed: {done.stderr.strip()}",
                           "image output")
        partial.rename(target)
    return out_dir


def entries(root: Path) -> list[tuple[Path, dict]]:
    """Every finished entry under `root` with its manifest, oldest first."""
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
            continue
        try:
            found.append((entry, read_manifest(entry)))
        except (OSError, ValueError):
            continue    # an unreadable manifest is not a finished entry
    return sorted(found, key=lambda item: (item[0] / MANIFEST).stat().st_mtime)


def retire(entry: Path) -> None:
    """Remove an entry that a rebuild replaces: renamed away first, so no reader ever sees it
    half-deleted."""
    doomed = entry.with_name(f".{entry.name}.retired-{os.getpid()}")
    entry.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
