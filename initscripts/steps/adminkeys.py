"""16 adminkeys: the operators' SSH public keys (the cluster setting `admin_ssh_keys`) as
root's authorized_keys.

The file is the setting, whole: a key removed from the setting is gone from every node at its
next boot, and nothing another tool wrote there survives. Each line is checked again here
(the model checked it when it was set): only a well-formed public key line, with no options
field, reaches the file; a line that is not one is left out and counted, so one bad value in
the database locks no one out of the other keys. Needs nothing but the database start-up
read (no other step): sshd reads the file at each login.
"""

from __future__ import annotations

from virtualinux.vvcm.fields import parse_ssh_public_key

from ..files import write_if_changed
from ..startup import Boot, Step

AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"


def authorized_keys(keys: tuple[str, ...]) -> tuple[str, int]:
    """The file's content and how many lines were left out as not well-formed."""
    lines = ["# Written at start-up from the cluster setting admin_ssh_keys; changes here "
             "are lost at the next boot."]
    dropped = 0
    for key in keys:
        try:
            line = parse_ssh_public_key(key)
        except ValueError:
            dropped += 1
            continue
        lines.append(line)
    return "\n".join(lines) + "\n", dropped


def run(boot: Boot) -> str:
    keys = boot.cluster.settings.admin_ssh_keys if boot.cluster.settings else ()
    content, dropped = authorized_keys(keys)
    path = boot.path(AUTHORIZED_KEYS)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)          # sshd's StrictModes refuses a group-writable ~/.ssh
    changed = write_if_changed(path, content, mode=0o600)
    written = len(keys) - dropped
    said = f"{written} admin key{'s' if written != 1 else ''} for root"
    if dropped:
        said += f", {dropped} malformed line{'s' if dropped != 1 else ''} left out"
    return said + ("" if changed else " (unchanged)")


STEP = Step(name="adminkeys", order=16, run=run, makes=AUTHORIZED_KEYS)
