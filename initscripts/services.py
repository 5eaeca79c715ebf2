"""Starting what start-up configured: systemd units on a node, nothing in tests.

systemd has no Python binding in the node image, and `systemctl` is its documented interface
for this; the unit names are ours, never from the database.
"""

from __future__ import annotations

import subprocess

from virtualinux.vvcm import VlxError

from .startup import Boot


def systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise VlxError(f"systemctl {' '.join(args)}: {message[-1] if message else 'failed'}")


def wait_started(boot: Boot, unit: str, timeout: float) -> bool:
    """Start `unit` if it is not running and wait until systemd calls it started (a Type=notify
    unit: until it said READY=1), at most `timeout` seconds; True if it is. A unit whose
    condition fails (its file was never written) counts as started: nothing will come."""
    if not boot.live:
        return True
    try:
        result = subprocess.run(["systemctl", "start", unit], capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def restart_if_changed(boot: Boot, unit: str, changed: bool) -> None:
    """Make `unit` run with the configuration just written: restart it when that changed,
    else start it if it is not running (both idempotent)."""
    if boot.live:
        systemctl("restart" if changed else "start", "--no-block", unit)
