"""A lab node's serial console: follow its log, or attach to QEMU's serial socket.

Following reads `serial.log` (QEMU appends everything the node writes, whether or not anyone
is attached) and keeps reading what is appended. Attaching connects to `serial.sock` and
passes keys both ways with the terminal in raw mode; Ctrl-] detaches, as in telnet. Only one
client can be attached at a time (QEMU's socket chardev takes one connection).

Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

DETACH = b"\x1d"   # Ctrl-]


def follow(path: Path, out: BinaryIO, stop: Callable[[], bool] = lambda: False,
           from_start: bool = True, interval: float = 0.2) -> None:
    """Copy `path` to `out`, then what is appended to it, until `stop()` is true."""
    with open(path, "rb") as file:
        if not from_start:
            file.seek(0, os.SEEK_END)
        while True:
            data = file.read(65536)
            if data:
                out.write(data)
                out.flush()
                continue
            if stop():
                return
            time.sleep(interval)


def attach(socket_path: Path, stdin: int | None = None, stdout: int | None = None) -> None:
    """Connect the terminal to the node's serial socket until Ctrl-] or the node goes away."""
    stdin = sys.stdin.fileno() if stdin is None else stdin
    stdout = sys.stdout.fileno() if stdout is None else stdout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(socket_path))
        saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
        try:
            if saved is not None:
                tty.setraw(stdin)
            _pump(conn, stdin, stdout)
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _pump(conn: socket.socket, stdin: int, stdout: int) -> None:
    while True:
        readable, _, _ = select.select([conn.fileno(), stdin], [], [])
        if conn.fileno() in readable:
            data = conn.recv(65536)
            if not data:
                return
            os.write(stdout, data)
        if stdin in readable:
            data = os.read(stdin, 1024)
            if not data or DETACH in data:
                with contextlib.suppress(OSError):
                    conn.sendall(data.split(DETACH, 1)[0])
                return
            conn.sendall(data)
