"""The lab's admin SSH key pair, made once per lab (STATE/admin/id_ed25519 and .pub): its public
half goes into the lab cluster's `admin_ssh_keys` (selfhost.py), and `vlx lab ssh` logs in with
its private half (admin.py). Imports only the model's key writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from virtualinux.vvcm import host_keys

ADMIN_DIR = "admin"
KEY_NAME = "id_ed25519"
KEY_COMMENT = "vlx-lab-admin"


def key_path(state_dir: Path) -> Path:
    return state_dir / ADMIN_DIR / KEY_NAME


def admin_public_key(state_dir: Path) -> str:
    """The lab's admin public key line, the pair made on first use (OpenSSH's file formats,
    written by the same code that writes the nodes' host keys)."""
    private = key_path(state_dir)
    public = private.with_name(KEY_NAME + ".pub")
    if not private.exists():
        private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        seed = os.urandom(32)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(host_keys.private_file(seed))
        public.write_text(host_keys.public_line(seed, KEY_COMMENT) + "\n")
    return public.read_text().strip()
