"""What the noun modules share: the parser class that carries options down to every verb,
opening the database named on the command line, printing."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..db import Database


class VlxParser(argparse.ArgumentParser):
    """An ArgumentParser whose *shared* options are accepted at its own level and after every
    sub-command below it: `vlx --db X db show` and `vlx db show --db X`, `vlx image --cache D
    list` and `vlx image list --cache D` (as git and kubectl users expect).

    Below the level that declares them, shared options default to SUPPRESS, so a value given
    early is not overwritten by a sub-parser's default (argparse copies every sub-parser
    default into the namespace). One more shared option is one `add_shared_argument` line.
    """

    def __init__(self, *args: Any, inherited: Sequence[tuple[tuple[str, ...], dict]] = (),
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shared: list[tuple[tuple[str, ...], dict]] = []
        for flags, options in inherited:
            self._add_shared(flags, {**options, "default": argparse.SUPPRESS})

    def add_shared_argument(self, *flags: str, **options: Any) -> argparse.Action:
        """An option of this parser that every sub-command declared after it accepts too."""
        return self._add_shared(flags, options)

    def _add_shared(self, flags: tuple[str, ...], options: dict) -> argparse.Action:
        self.shared.append((flags, options))
        return self.add_argument(*flags, **options)

    def add_subparsers(self, **kwargs: Any):
        kwargs.setdefault("parser_class", functools.partial(
            VlxParser, inherited=tuple(self.shared)))
        return super().add_subparsers(**kwargs)


def database(args: argparse.Namespace) -> Database:
    """The database named by --db or --store (else $VLX_STORE, else $VLX_DB, else the default
    file)."""
    return Database(args.db, store=getattr(args, "store", None))


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_verb(verbs: argparse._SubParsersAction, name: str, handler: Any, help: str,
             json: bool = False, **options: Any) -> argparse.ArgumentParser:
    """One verb: its parser, run by `handler(args)`, with `--json` if it prints data."""
    parser = verbs.add_parser(name, help=help, **options)
    if json:
        add_json_flag(parser)
    parser.set_defaults(handler=handler)
    return parser


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, headers))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 volume', '2 volumes', '1 VCPU', '6 VCPUs'."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def name_range(names: Sequence[str]) -> str:
    """'node5-root', 'node1-root .. node4-root' (for a count the caller prints)."""
    if not names:
        return "-"
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def warn(message: str) -> None:
    print(f"vlx: warning: {message}", file=sys.stderr)


def _size(count: float) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count:.0f} B"


class ProgressLine:
    """Bytes done, rate and time left of long work, redrawn in place on a terminal (stderr);
    silent when stderr is not one (scripts and logs get the command's one result line)."""

    REDRAW = 0.1   # seconds between redraws

    def __init__(self, stream=None, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.clock = clock
        self.shown = self.stream.isatty()
        self.started: dict[str, float] = {}
        self.drawn = float("-inf")

    def __call__(self, name: str, done: int, total: int) -> None:
        if not self.shown:
            return
        now = self.clock()
        start = self.started.setdefault(name, now)
        finished = done >= total
        if not finished and now - self.drawn < self.REDRAW:
            return
        self.drawn = now
        self.stream.write("\r\x1b[2K" + self.line(name, done, total, now - start)
                          + ("\n" if finished else ""))
        self.stream.flush()

    @staticmethod
    def line(name: str, done: int, total: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else None
        eta = f"ETA {int(left) // 60}:{int(left) % 60:02d}" if left is not None else "ETA -"
        percent = 100 * done / total if total else 100.0
        return (f"{name}: {_size(done)} / {_size(total)} of data ({percent:.0f}%), "
                f"{_size(rate)}/s, {'done' if done >= total else eta}")
