"""The `vlx` command line: nouns and verbs (`vlx node list`, `vlx vc define`), one module a noun.

Every module of this package that defines `register(subparsers)` adds its noun; the command
handlers it sets take `(args)` and return an exit code. This is the only place that imports the
areas (bootsvc, netboot, storage, ...); nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ..errors import VlxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlx", description="virtualinux: diskless clusters with no master node")
    parser.add_argument("--db", metavar="PATH",
                        help="cluster database (default: $VLX_DB or "
                             "/var/lib/virtualinux/cluster.db)")
    parser.add_argument("--store", metavar="URL",
                        help="cluster database as a store URL: sqlite:PATH or "
                             "etcd://HOST:PORT[,HOST:PORT...] (default: $VLX_STORE, else --db)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    nouns = parser.add_subparsers(dest="noun", metavar="NOUN", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(nouns)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.handler(args) or 0)
    except VlxError as err:
        print(f"vlx: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
