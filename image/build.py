"""The build driver of the node and guest images: diskimage-builder with our elements, then a
root file system image made without device-mapper, all cached by the hash of the inputs.

    inputs -> key -> cached?  yes: hand out the cache entry at once
                              no:  [node] pip wheel of virtualinux and its dependencies
                                   disk-image-create -t tar debian-minimal virtualinux-KIND
                                   untar, take /boot's kernel and initrd out
                                   mkfs.ext4 -L vroot -d ROOTFS root.img (no loop, no dm)
                                   manifest.json (inputs, package versions, sizes)
                                   publish the entry by one rename

Every step writes into a temporary directory inside the cache; a failure leaves nothing in the
cache or the output directory, and says which phase (and element) failed and where the log is.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import uuid
from importlib import metadata
from pathlib import Path

import tomli_w

from ..vvcm.errors import VlxError
from . import cache, dib
from .dib import Clock, Mirrors, Progress, stderr_progress

# What each kind is made of: DIB's distro element, then ours.
ELEMENTS = {
    "node": ("debian-minimal", "virtualinux-node"),
    "guest": ("debian-minimal", "virtualinux-guest"),
}
ROOT_LABEL = "vroot"
ROOT_IMAGE = "root.img"
MIN_ROOT_MIB = 256
# Bump when this driver changes what it makes of DIB's output (mkfs options, file names, ...).
# Not a hash of this file: a full rebuild takes minutes, a comment fix should not cost one.
OUTPUT_FORMAT = "3"
HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent     # an editable install: the checkout whose wheel goes into the node


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What to build; parsed and checked once (`image_spec`), then passed down."""
    kind: str
    release: str = "bookworm"
    mirrors: Mirrors = Mirrors()
    root_size_mib: int | None = None     # None: what the tree needs plus headroom
    xen: bool = False
    source: Path = REPOSITORY            # the virtualinux checkout installed in node images
                                         # (--source, else $VLX_IMAGE_SOURCE, else this one)


def image_spec(kind: str, release: str = "bookworm", mirror: str | None = None,
               security_mirror: str | None = None, root_size_mib: int | None = None,
               xen: bool = False, source: Path | None = None) -> ImageSpec:
    """An ImageSpec from command-line values, or VlxError naming the bad one."""
    where = "vlx image build"
    if kind not in ELEMENTS:
        raise VlxError(f"unknown image kind {kind!r} (choose from {', '.join(ELEMENTS)}, tiny)",
                       where)
    if not re.fullmatch(r"[a-z][a-z0-9-]*", release):
        raise VlxError(f"--release {release!r} is not a Debian release name (bookworm)", where)
    defaults = Mirrors()
    mirrors = Mirrors(mirror or defaults.debian, security_mirror or defaults.security)
    for flag, url in (("--mirror", mirrors.debian), ("--security-mirror", mirrors.security)):
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise VlxError(f"{flag} {url!r} is not an http:// or https:// URL", where)
    if root_size_mib is not None and root_size_mib < MIN_ROOT_MIB:
        raise VlxError(f"--root-size {root_size_mib} MiB is below {MIN_ROOT_MIB} MiB", where)
    if xen and kind != "node":
        raise VlxError("--xen is for node images only", where)
    source = (source or Path(os.environ.get("VLX_IMAGE_SOURCE") or REPOSITORY)).resolve()
    if kind == "node" and not (source / "pyproject.toml").is_file():
        raise VlxError(f"{source} is not a virtualinux checkout (no pyproject.toml); "
                       "give --source DIR", where)
    return ImageSpec(kind, release, mirrors, root_size_mib, xen, source)


# What a node runs is every package of the checkout but these: the virtual lab and the
# benchmarks drive QEMU, namespaces and peer servers on a developer's machine, never on a node.
# `pip install -e .` of the checkout still has them all.
DEVELOPER_PACKAGES = ("virtualinux.vm_test", "virtualinux.bench")


def _setuptools_config(source: Path) -> dict:
    config = tomllib.loads((source / "pyproject.toml").read_text())
    return config.get("tool", {}).get("setuptools", {})


def node_package_dirs(source: Path) -> dict[str, str]:
    """Package -> folder, for the packages the node wheel carries."""
    return {package: folder
            for package, folder in _setuptools_config(source).get("package-dir", {}).items()
            if package not in DEVELOPER_PACKAGES}


def wheel_sources(source: Path) -> list[str]:
    """What the node wheel of the checkout is made of: pyproject, README and every package
    folder it carries (tests, bench, vm-test, .git and the venv are not in it)."""
    folders = set(node_package_dirs(source).values())
    files = [name for name in ("pyproject.toml", "README.md") if (source / name).is_file()]
    # vvcm/cli is mapped too, but it is inside vvcm: copy and hash each file once.
    tops = [folder for folder in folders
            if not any(folder.startswith(f"{other}/") for other in folders)]
    return files + sorted(folder for folder in tops if (source / folder).is_dir())


def node_source(source: Path, copy: Path) -> Path:
    """Into `copy`: exactly the hashed files, with a pyproject.toml that lists only the
    node's packages, so `pip wheel` of it builds the node wheel."""
    copy.mkdir(parents=True, exist_ok=True)
    for name in wheel_sources(source):
        if (source / name).is_dir():
            shutil.copytree(source / name, copy / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source / name, copy / name)
    config = tomllib.loads((source / "pyproject.toml").read_text())
    setuptools = config.setdefault("tool", {}).setdefault("setuptools", {})
    setuptools["packages"] = [package for package in setuptools.get("packages", [])
                              if package not in DEVELOPER_PACKAGES]
    setuptools["package-dir"] = node_package_dirs(source)
    (copy / "pyproject.toml").write_text(tomli_w.dumps(config))
    return copy


def source_tree_hash(source: Path) -> str:
    parts = {}
    for name in wheel_sources(source):
        path = source / name
        parts[name] = cache.sha256_tree(path) if path.is_dir() else cache.sha256_file(path)
    return cache.input_key(parts)


def image_inputs(spec: ImageSpec) -> dict[str, str]:
    """Everything that decides the image, by name; `cache.input_key` of it names the entry.
    Debian package versions are not known before a build: they are recorded in the manifest,
    and `--rebuild` takes newer ones."""
    inputs = {
        "kind": spec.kind,
        "elements": " ".join(ELEMENTS[spec.kind]),
        "elements-tree": cache.sha256_tree(dib.ELEMENTS_DIR),
        "release": spec.release,
        "mirror": spec.mirrors.debian,
        "security-mirror": spec.mirrors.security,
        "root-size-mib": str(spec.root_size_mib or "auto"),
        "xen": str(int(spec.xen)),
        "diskimage-builder": metadata.version("diskimage-builder"),
        "output-format": OUTPUT_FORMAT,
    }
    if spec.kind == "node":
        inputs["virtualinux-source"] = source_tree_hash(spec.source)
    return inputs


def check_mirror(spec: ImageSpec) -> None:
    """Fail in a second, not after a debootstrap or apt timeout, when a mirror does not
    answer for the release."""
    for name, url in (
            ("Debian mirror", f"{spec.mirrors.debian.rstrip('/')}/dists/{spec.release}/Release"),
            ("Debian security mirror",
             f"{spec.mirrors.security.rstrip('/')}/dists/{spec.release}-security/Release")):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20):
                pass
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise VlxError(f"the {name} does not answer for {spec.release}: {url}: {reason}",
                           "image build, phase mirror") from err


def run_logged(cmd: list[str], log_path: Path, phase: str, cwd: Path | None = None) -> str:
    """Run one step, its output appended to the build log; VlxError naming the phase if it
    fails. Returns its standard output."""
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True,
                              errors="replace")
        log.write(done.stdout if len(done.stdout) < 20000 else done.stdout[:20000] + "...\n")
    if done.returncode != 0:
        text = log_path.read_text(errors="replace")[-4000:]
        reason = "no space left on device" if re.search(
            r"No space left|Could not allocate block", text) else f"exit code {done.returncode}"
        raise VlxError(f"{cmd[0]} failed ({reason}); full log: {log_path}",
                       f"image build, phase {phase}")
    return done.stdout


def build_wheels(spec: ImageSpec, work: Path, log_path: Path) -> Path:
    """Wheels of virtualinux (what a node runs: `node_source`) and all its dependencies in
    `work/wheels`. The wheel is built from a copy of exactly the hashed files: pip builds in
    the tree it is given, and the checkout (shared with others) must not grow a build/
    folder."""
    copy = node_source(spec.source, work / "source")
    wheel_dir = work / "wheels"
    run_logged([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check",
                "--wheel-dir", str(wheel_dir), str(copy)], log_path, "wheels")
    return wheel_dir


def boot_files(rootfs: Path) -> tuple[Path, Path]:
    """The image's one kernel and its initrd, from /boot."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise VlxError(f"expected one kernel in the image's /boot, found "
                       f"{[k.name for k in kernels]}", "image build, phase extract")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise VlxError(f"the image has no {initrd.name}", "image build, phase extract")
    return kernels[0], initrd


def installed_packages(rootfs: Path, log_path: Path) -> dict[str, str]:
    listing = run_logged(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W",
                          "-f", "${Package} ${Version}\n"], log_path, "manifest")
    return dict(line.split(" ", 1) for line in listing.splitlines() if " " in line)


def tree_mib(rootfs: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1M", str(rootfs)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


def root_size(spec: ImageSpec, used_mib: int) -> int:
    """The root file system's size: given, or the tree plus a quarter (at least 512 MiB) for
    what the machines write into their snapshots, rounded up to 64 MiB."""
    if spec.root_size_mib is not None:
        return spec.root_size_mib
    wanted = used_mib + max(512, used_mib // 4)
    return -(-wanted // 64) * 64


def make_root_image(rootfs: Path, image: Path, size_mib: int, key: str, log_path: Path) -> None:
    # The UUID follows from the key: the same inputs give the same file system identity.
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"virtualinux-image:{key}"))
    run_logged(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", fs_uuid, "-d", str(rootfs),
                str(image), f"{size_mib}M"], log_path, "mkfs")


def _build(spec: ImageSpec, staged: Path, root: Path, inputs: dict[str, str], key: str,
           log_path: Path, clock: Clock) -> None:
    extra_env = {"DIB_VLX_XEN": str(int(spec.xen))}
    wheels: list[str] = []
    if spec.kind == "node":
        clock.say("wheels: virtualinux and its dependencies")
        wheel_dir = build_wheels(spec, staged, log_path)
        wheels = sorted(path.name for path in wheel_dir.glob("*.whl"))
        extra_env["DIB_VLX_WHEEL_DIR"] = str(wheel_dir)
    clock.say(f"dib: {' '.join(ELEMENTS[spec.kind])} ({spec.release}, {spec.mirrors.debian})")
    dib_cache = root / "dib-cache"
    dib_cache.mkdir(exist_ok=True)
    env = dib.environment(spec.release, spec.mirrors, dib_cache, extra_env)
    # DIB bind-mounts one apt archive from its cache into every build's chroot, and two apt
    # runs on it at once fail on its lock: DIB runs of one cache take turns.
    with cache.build_lock(dib_cache, "dib", "shared-cache",
                          waiting=lambda: clock.say("waiting for another build's DIB run")):
        dib.disk_image_create(ELEMENTS[spec.kind], staged / "dib" / spec.kind, ROOT_LABEL,
                              log_path, env, clock)
    clock.say("extract: root tree, kernel and initrd")
    rootfs = staged / "rootfs"
    rootfs.mkdir()
    run_logged(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf",
                str(staged / "dib" / f"{spec.kind}.tar"), "-C", str(rootfs)], log_path,
               "extract")
    (staged / "dib" / f"{spec.kind}.tar").unlink()
    kernel, initrd = boot_files(rootfs)
    run_logged(["cp", str(kernel), str(staged / "vmlinuz")], log_path, "extract")
    run_logged(["cp", str(initrd), str(staged / "initrd.img")], log_path, "extract")
    if spec.kind == "node" and not (rootfs / "opt/virtualinux/bin/vlx").exists():
        raise VlxError("virtualinux is not installed in the image (/opt/virtualinux/bin/vlx)",
                       "image build, phase extract")
    packages = installed_packages(rootfs, log_path)
    used = tree_mib(rootfs)
    size = root_size(spec, used)
    clock.say(f"mkfs: ext4 {ROOT_LABEL}, {size} MiB for a {used} MiB tree")
    make_root_image(rootfs, staged / ROOT_IMAGE, size, key, log_path)
    run_logged(["rm", "-rf", "--one-file-system", str(rootfs), str(staged / "dib"),
                str(staged / "wheels"), str(staged / "source")], log_path, "cleanup")
    artifacts = {}
    for name in ("vmlinuz", "initrd.img", ROOT_IMAGE):
        path = staged / name
        artifacts[name] = {"size": path.stat().st_size, "sha256": cache.sha256_file(path)}
    artifacts[ROOT_IMAGE].update(label=ROOT_LABEL, tree_mib=used)
    cache.write_manifest(staged, {
        "kind": spec.kind, "key": key, "inputs": inputs, "release": spec.release,
        "kernel": kernel.name.removeprefix("vmlinuz-"), "artifacts": artifacts,
        "packages": packages, "wheels": wheels, "log": str(log_path),
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "build_seconds": round(clock.elapsed(), 1),
    })


def build_image(spec: ImageSpec, out_dir: Path | None = None, cache_dir: Path | None = None,
                progress: Progress = stderr_progress, rebuild: bool = False) -> Path:
    """The directory holding `vmlinuz`, `initrd.img`, `root.img` and `manifest.json`: the
    cache entry (read-only), or `out_dir` with copies. Builds only when nothing cached
    matches the inputs (or `rebuild`)."""
    clock = Clock(progress)
    root = cache.cache_root(cache_dir)
    inputs = image_inputs(spec)
    key = cache.input_key(inputs)
    entry = None if rebuild else cache.cached(root, spec.kind, key)
    if entry is None:
        with cache.build_lock(root, spec.kind, key):
            entry = None if rebuild else cache.cached(root, spec.kind, key)
            if entry is None:
                entry = _build_entry(spec, root, inputs, key, clock)
    else:
        clock.say(f"cached: {spec.kind} {key}")
    return cache.deliver(entry, out_dir) if out_dir is not None else entry


def _build_entry(spec: ImageSpec, root: Path, inputs: dict[str, str], key: str,
                 clock: Clock) -> Path:
    check_mirror(spec)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    log_path = logs / f"{spec.kind}-{key}-{stamp}.log"
    clock.say(f"building {spec.kind} {key}; log: {log_path}")
    try:
        with cache.staging(root, spec.kind) as staged:
            _build(spec, staged, root, inputs, key, log_path, clock)
            target = cache.entry_dir(root, spec.kind, key)
            if target.exists():     # --rebuild: the old entry goes only once the new one is whole
                cache.retire(target)
            entry = cache.publish(staged, target)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise VlxError(f"no space left on device; full log: {log_path}",
                           "image build") from err
        raise
    clock.say(f"done: {entry}")
    return entry
