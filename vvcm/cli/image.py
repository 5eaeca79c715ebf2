"""`vlx image`: build the node, guest and tiny lab images, and list or show the cached ones."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ...image import cache
from ...image.build import ELEMENTS, build_image, image_spec
from ...image.dib import stderr_progress
from ...image.tiny import build_tiny
from ..errors import VlxError
from .common import add_verb, print_json, print_table

KINDS = (*ELEMENTS, "tiny")


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("image", help="node, guest and lab images",
                              description="Build images (cached by the hash of their inputs) "
                                          "and look at the ones built.")
    parser.add_shared_argument("--cache", type=Path, metavar="DIR",
                        help="image cache (default: $VLX_IMAGE_CACHE or "
                                    f"{cache.DEFAULT_ROOT})")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    build = add_verb(verbs, "build", cmd_build, help="build an image, or reuse the cached build")
    build.add_argument("kind", help=f"what to build: {', '.join(KINDS)}")
    build.add_argument("--out", type=Path, metavar="DIR",
                       help="copy the artifacts here (default: print the cache entry)")
    build.add_argument("--release", default="bookworm", help="Debian release (node, guest)")
    build.add_argument("--mirror", metavar="URL",
                       help="Debian mirror (default: $VLX_DEBIAN_MIRROR or deb.debian.org)")
    build.add_argument("--security-mirror", metavar="URL",
                       help="Debian security mirror (default: $VLX_DEBIAN_SECURITY_MIRROR or "
                            "deb.debian.org/debian-security)")
    build.add_argument("--root-size", type=int, metavar="MIB",
                       help="size of root.img (default: the tree plus headroom)")
    build.add_argument("--xen", action="store_true", help="node: add the Xen hypervisor")
    build.add_argument("--source", type=Path, metavar="DIR",
                       help="node: the virtualinux checkout to install (default: "
                            "$VLX_IMAGE_SOURCE or this one)")
    build.add_argument("--rebuild", action="store_true",
                       help="build even if a cached image has the same inputs")

    add_verb(verbs, "list", cmd_list, help="the cached images", json=True)

    show = add_verb(verbs, "show", cmd_show, help="one cached image's manifest", json=True)
    show.add_argument("name", help="KIND (the newest of that kind), KIND-KEY or KEY")

    prune = add_verb(verbs, "prune", cmd_prune,
                     help="remove all but the most recently used images of each kind (a "
                          "build does this itself, keeping $VLX_IMAGE_CACHE_KEEP or "
                          f"{cache.DEFAULT_KEEP})")
    prune.add_argument("--keep", type=int, default=None, metavar="N",
                       help="how many of each kind to keep (default: $VLX_IMAGE_CACHE_KEEP or "
                            f"{cache.DEFAULT_KEEP})")


def cmd_build(args: argparse.Namespace) -> int:
    if args.kind not in KINDS:
        raise VlxError(f"unknown image kind {args.kind!r} (choose from {', '.join(KINDS)})")
    if args.kind == "tiny":
        print(build_tiny(out_dir=args.out, cache_dir=args.cache, progress=stderr_progress))
        return 0
    spec = image_spec(args.kind, release=args.release,
                      mirror=args.mirror or os.environ.get("VLX_DEBIAN_MIRROR"),
                      security_mirror=(args.security_mirror
                                       or os.environ.get("VLX_DEBIAN_SECURITY_MIRROR")),
                      root_size_mib=args.root_size, xen=args.xen, source=args.source)
    print(build_image(spec, out_dir=args.out, cache_dir=args.cache, rebuild=args.rebuild))
    return 0


def _size(entry: Path) -> int:
    return sum(path.stat().st_size for path in entry.iterdir() if path.is_file())


def cmd_list(args: argparse.Namespace) -> int:
    found = cache.entries(cache.cache_root(args.cache))
    if args.json:
        print_json([{"path": str(entry), **manifest} for entry, manifest in found])
        return 0
    print_table(["KIND", "KEY", "SIZE_MB", "PATH"],
                [[manifest.get("kind", "?"), manifest.get("key", "?"),
                  f"{_size(entry) / 1e6:.1f}", entry] for entry, manifest in found])
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    keep = cache.keep_count() if args.keep is None else args.keep
    if keep < 0:
        raise VlxError(f"cannot keep {keep} images", "--keep")
    root = cache.cache_root(args.cache)
    kinds = sorted({manifest["kind"] for _, manifest in cache.entries(root)
                    if isinstance(manifest.get("kind"), str)})
    for kind in kinds:
        for entry in cache.prune(root, kind, keep):
            print(f"removed {entry}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    found = cache.entries(cache.cache_root(args.cache))
    matches = [(entry, manifest) for entry, manifest in found
               if args.name in (manifest.get("kind"), manifest.get("key"), entry.name)]
    if not matches:
        raise VlxError(f"no cached image named {args.name!r} (see `vlx image list`)")
    entry, manifest = matches[-1]
    if args.json:
        print_json({"path": str(entry), **manifest})
        return 0
    print(f"{manifest.get('kind')} {manifest.get('key')}  {entry}")
    for name, artifact in sorted(manifest.get("artifacts", {}).items()):
        print(f"  {name:<14} {artifact['size'] / 1e6:9.1f} MB  sha256 {artifact['sha256'][:16]}")
    for name, value in sorted(manifest.get("inputs", {}).items()):
        print(f"  input {name}: {value}")
    kernel = manifest.get("kernel")
    if isinstance(kernel, dict):   # tiny: the kernel package it took vmlinuz and modules from
        print(f"  kernel {kernel.get('package')} {kernel.get('version')}")
    elif kernel:
        print(f"  kernel {kernel}")
    packages = manifest.get("packages") or {}
    if packages:
        print(f"  packages ({len(packages)}):")
        for name, version in sorted(packages.items()):
            print(f"    {name:<32} {version}")
    return 0
