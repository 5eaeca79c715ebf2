"""How to run `vlx` as a process in this very interpreter (its venv, its checkout), whether or
not a `vlx` script is on PATH: for the lab, the benches and the tests that start replicas or
watchers. The one place that knows the module path; nothing here imports the command line."""

from __future__ import annotations

import sys

VLX_MODULE = "virtualinux.vvcm.cli"


def vlx_command(*argv: str) -> list[str]:
    """`[python, -m, virtualinux.vvcm.cli, *argv]`: `vlx ARGV` for subprocess."""
    return [sys.executable, "-m", VLX_MODULE, *argv]
