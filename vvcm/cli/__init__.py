"""The `vlx` command line: nouns and verbs (`vlx node list`, `vlx vc define`), one module a noun.

Every module of this package that defines `register(subparsers)` adds its noun; the command
handlers it sets take `(args)` and return an exit code. This is the only place that imports the
areas (bootsvc, netboot, storage, ...); nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import pkgutil
import sys

from ..errors import VlxError
from .common import VlxParser


def _global_parser() -> VlxParser:
    parser = VlxParser(
        prog="vlx", description="virtualinux: diskless clusters with no master node")
    parser.add_argument("--version", action=_VersionAction)
    # Global options: accepted before the noun and after any verb (common.VlxParser).
    parser.add_shared_argument("--db", metavar="PATH",
                               help="cluster database (default: $VLX_DB or "
                                    "/var/lib/virtualinux/cluster.db)")
    parser.add_shared_argument("--store", metavar="URL",
                               help="cluster database as a store URL: sqlite:PATH or "
                                    "etcd://HOST:PORT[,HOST:PORT...] (default: $VLX_STORE, "
                                    "else --db)")
    parser.add_shared_argument("-v", "--verbose", action="store_true",
                               help="log details (debug level) on stderr")
    return parser


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only` (a noun module's name), just that noun's module
    is imported and registered (`main` passes the noun it finds in argv)."""
    parser = _global_parser()
    nouns = parser.add_subparsers(dest="noun", metavar="NOUN", required=True)
    names = sorted(info.name for info in pkgutil.iter_modules(__path__)
                   if not info.name.startswith("_"))   # __main__: `python -m ...cli`
    if only in names and hasattr(importlib.import_module(f"{__name__}.{only}"), "register"):
        names = [only]
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register(nouns)
    return parser


def noun_of(argv: list[str]) -> str | None:
    """The noun `argv` names, if a noun module of that name exists (else None: the whole
    parser is built, for `vlx --help` and for argparse's message on an unknown noun).

    Every noun module imports the areas it drives (libvirt, pyroute2, cryptography, the lab):
    all of them take ~6 s to import on a node's emulated CPU, where `vlx bootsvc run` and
    the other commands a node runs at boot need one noun's."""
    # A global option that takes a value: the word after it is not the noun.
    valued = {flag for flags, options in _global_parser().shared
              if options.get("action", "store") == "store" for flag in flags}
    words = iter(argv)
    for word in words:
        if word in valued:
            next(words, None)
        elif not word.startswith("-"):
            known = (word.isidentifier() and not word.startswith("_")
                     and importlib.util.find_spec(f"{__name__}.{word}") is not None)
            return word if known else None
    return None


class _VersionAction(argparse.Action):
    """--version, looked up only when asked: importlib.metadata and its search of the
    installed distributions cost every `vlx` run ~30 ms here, and a node's boot far more."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        import importlib.metadata
        try:
            version = importlib.metadata.version("virtualinux")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        print(f"{parser.prog} {version}")       # on stdout, as argparse's own version action
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(noun_of(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    # A command prints what it did on stdout; its INFO log lines would only repeat that on
    # stderr. Daemons (`bootsvc run`, `storage serve --watch`) log their events at INFO:
    # they say so with `set_defaults(logs_events=True)` or by raising their loggers' level.
    if args.verbose:
        level = logging.DEBUG
    elif getattr(args, "logs_events", False):
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return int(args.handler(args) or 0)
    except VlxError as err:
        print(f"vlx: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
