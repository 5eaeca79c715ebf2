"""The secrets an inventory does not carry: the per-owner CHAP credentials, written beside an
exported inventory (`cluster.toml` -> `cluster.secrets.toml`, mode 0600) by `vlx db export
--with-secrets`, and read back by `vlx db import`. Kept out of the inventory itself so the
inventory stays a file one can show, diff and mail; the secrets file is one to guard.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import tomli_w

from .errors import VlxError
from .model import Cluster, Credential

MODE = 0o600
KEYS = ("owner", "username", "secret")


def secrets_path(inventory: Path) -> Path:
    """`cluster.toml` -> `cluster.secrets.toml` (beside it)."""
    return inventory.with_name(f"{inventory.stem}.secrets.toml")


def write(cluster: Cluster, path: Path) -> int:
    """Write the cluster's credentials to `path`, readable by its owner only (never, not even
    for a moment, by anyone else); returns how many."""
    text = ("# virtualinux CHAP credentials: keep private. `vlx db import` of the inventory "
            "beside this file restores them.\n\n"
            + tomli_w.dumps({"credential": [dataclasses.asdict(c) for c in cluster.credentials]}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MODE)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)
    return len(cluster.credentials)


def read(path: Path) -> tuple[Credential, ...]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise VlxError(f"cannot read secrets: {err.strerror}", str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise VlxError(f"TOML syntax error: {err}", str(path)) from None
    if os.stat(path).st_mode & 0o077:
        raise VlxError(f"others may read this file (mode {os.stat(path).st_mode & 0o777:o}): "
                       f"chmod 600 it first", str(path))
    entries = data.get("credential", [])
    if set(data) - {"credential"} or not isinstance(entries, list):
        raise VlxError("expected only [[credential]] entries", str(path))
    found = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or set(entry) != set(KEYS) or not all(
                isinstance(entry[key], str) and entry[key] for key in KEYS):
            raise VlxError(f"[[credential]] #{number}: needs exactly {', '.join(KEYS)} "
                           "as non-empty strings", str(path))
        found.append(Credential(**entry))
    return tuple(found)


def restore(cluster: Cluster, credentials: tuple[Credential, ...]) -> tuple[Cluster, int]:
    """The cluster with these credentials for the owners it has (others are dropped: an owner
    that is gone has no login), replacing what it holds for them; and how many were taken."""
    owners = cluster.secret_owners()
    taken = {c.owner: c for c in credentials if c.owner in owners}
    kept = tuple(c for c in cluster.credentials if c.owner not in taken)
    return dataclasses.replace(cluster, credentials=kept + tuple(taken.values())), len(taken)
