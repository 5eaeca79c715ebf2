"""15 sshkeys: the node's own SSH host key, the one `vlx` made for it, installed for sshd.

The key reaches the node in its own cpio, which replicas hand only to the node's address; the
initramfs moves it to /run/virtualinux/node (tmpfs, mode 0700), and this step writes
/etc/ssh/ssh_host_ed25519_key (0600, root) and its .pub (0644) and points sshd at that key
alone, so the node presents the same key after every reboot and on a re-created snapshot, and
never one its golden image or `ssh-keygen -A` made. A key file that already holds this key is
left alone (OpenSSH's file has random check bytes: the key is compared, not the bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

from virtualinux.vvcm import host_keys

from ..files import write_if_changed
from ..services import restart_if_changed
from ..startup import Boot, Step, StepFailed

DELIVERED = "/run/virtualinux/node/" + host_keys.NODE_FILE
KEY = "/etc/ssh/ssh_host_ed25519_key"
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/virtualinux-host-key.conf"


def sshd_drop_in() -> str:
    return ("# Written at start-up: this node's host key from the cluster database, and no "
            "other.\n"
            f"HostKey {KEY}\n")


def _write_secret(path: Path, text: str) -> None:
    """Write a private key: made 0600 before a byte is in it, owned by root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(f".{path.name}.new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(fresh, path)


def run(boot: Boot) -> str:
    name = boot.node.name
    try:
        seed = host_keys.read_node_file(boot.path(DELIVERED).read_text(), name)
    except FileNotFoundError:
        raise StepFailed(f"no host key was handed to {name} ({DELIVERED} is missing): "
                         f"`vlx node keys {name}` makes one, the node takes it at its next "
                         "boot") from None
    key = boot.path(KEY)
    try:
        installed = host_keys.seed_of_private_file(key.read_text())
    except (FileNotFoundError, UnicodeDecodeError):
        installed = None
    changed = installed != seed
    if changed:
        _write_secret(key, host_keys.private_file(seed))
    elif key.stat().st_mode & 0o077:
        key.chmod(0o600)        # sshd refuses a key others may read
        changed = True
    public = host_keys.public_line(seed, f"root@{name}")
    changed = write_if_changed(boot.path(KEY + ".pub"), public + "\n") or changed
    changed = write_if_changed(boot.path(SSHD_DROP_IN), sshd_drop_in()) or changed
    restart_if_changed(boot, "ssh.service", changed)
    return (f"ed25519 host key {host_keys.fingerprint(seed)}"
            f"{'' if changed else ' (unchanged)'}")


STEP = Step(name="sshkeys", order=15, run=run, makes=f"{KEY}, {KEY}.pub, {SSHD_DROP_IN}")
