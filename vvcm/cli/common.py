"""What the noun modules share: the parser class that carries options down to every verb,
opening the database named on the command line, printing."""

from __future__ import annotations

import argparse
import functools
import json
import sys
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

    def add_subparsers(self, **kwargs: Any):  # type: ignore[override]
        kwargs.setdefault("parser_class", functools.partial(
            VlxParser, inherited=tuple(self.shared)))
        return super().add_subparsers(**kwargs)


def database(args: argparse.Namespace) -> Database:
    return Database(args.db)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


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


def name_range(names: Sequence[str], most: int = 10) -> str:
    """'node5-root', 'node1-root .. node4-root' (for a count the caller prints)."""
    if not names:
        return "-"
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
