"""Waiting in tests and the lab on an event the code exposes (a status, a file, a counter),
with a generous upper bound as a safety net only."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
