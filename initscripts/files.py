"""Writing the files start-up makes: whole, atomically, and only when their content changes,
so running a step twice changes nothing the second time."""

from __future__ import annotations

import os
import re
from pathlib import Path

from virtualinux.vvcm import VlxError

# The first line of a file whose change restarts a service. It names no generation: with one, a
# reboot after any change to the database would rewrite every such file and restart every
# service (a replica's start costs a TCG node ~10 s), whatever the change was.
SERVICE_FILE_HEADER = ("# Written at start-up from the cluster database; changes here are lost "
                       "at the next boot.")

# What a value from the database may look like before it goes into a configuration file that
# another program parses (chrony, hosts, a unit's environment): no spaces, quotes, newlines or
# shell metacharacters, whatever the model's own checks let through.
_PLAIN = re.compile(r"[A-Za-z0-9/][A-Za-z0-9._:/@+,=-]*")


def plain(value: object, what: str) -> str:
    text = str(value)
    if not _PLAIN.fullmatch(text):
        raise VlxError(f"{what} {text!r} cannot go into a configuration file (letters, digits "
                       "and . _ : / @ + , = - only)")
    return text


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    """Write `content` to `path` unless it holds exactly that already; True if written."""
    try:
        if path.read_text() == content:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(f".{path.name}.new")
    fresh.write_text(content)
    os.chmod(fresh, mode)
    os.replace(fresh, path)
    return True
