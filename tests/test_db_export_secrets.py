"""`vlx db export` says what an export leaves out; `--with-secrets` writes the CHAP
credentials (mode 0600) beside the inventory, and `vlx db import` restores them."""

from __future__ import annotations

import os
import stat

import pytest
from virtualinux.storage.naming import ensure_credentials
from virtualinux.vvcm.db import Database

from .conftest import EXAMPLE, vlx


@pytest.fixture
def cluster_db(db_path, capsys):
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    Database(db_path).update("test", "logins", lambda c: ensure_credentials(c, ["node1", "node2"]))
    return db_path


def test_export_with_secrets_then_import_restores_the_chap_credentials(cluster_db, tmp_path,
                                                                        monkeypatch, capsys):
    original = Database(cluster_db).load().credentials
    # Two CHAP logins and the four nodes' SSH host keys (made by the import).
    assert len(original) == 6
    out = tmp_path / "cluster.toml"
    code, text, _ = vlx(capsys, "db", "export", "-o", str(out), "--with-secrets")
    assert code == 0
    secrets = tmp_path / "cluster.secrets.toml"
    assert text.splitlines() == [
        f"wrote {out}: 4 nodes, 3 VCs, 0 volumes (generation 2)",
        f"wrote {secrets} (mode 0600): 6 secrets; not exported: the generation "
        "and the change log"]
    assert stat.S_IMODE(os.stat(secrets).st_mode) == 0o600
    assert original[0].secret not in out.read_text()     # the inventory stays showable
    assert original[0].secret in secrets.read_text()

    monkeypatch.setenv("VLX_DB", str(tmp_path / "copy.db"))
    code, text, _ = vlx(capsys, "db", "import", str(out))
    assert code == 0 and f"restored 6 secrets from {secrets}" in text
    assert Database(tmp_path / "copy.db").load().credentials == original


def test_export_without_secrets_says_what_it_leaves_out(cluster_db, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "cluster.toml"
    code, text, _ = vlx(capsys, "db", "export", "-o", str(out))
    assert code == 0 and text.endswith(
        "not exported: the secrets (CHAP logins, SSH host keys) (--with-secrets), the "
        "generation and the change log\n")
    assert not (tmp_path / "cluster.secrets.toml").exists()
    code, text, err = vlx(capsys, "db", "export")
    assert code == 0 and text.startswith("# virtualinux inventory")   # stdout stays TOML
    assert "not exported: the secrets" in err
    monkeypatch.setenv("VLX_DB", str(tmp_path / "copy.db"))
    code, text, _ = vlx(capsys, "db", "import", str(out))
    assert code == 0 and "restored" not in text
    copy = Database(tmp_path / "copy.db").load()
    # No CHAP login came back, and the host keys are new ones, not the exported database's.
    assert {c.owner for c in copy.credentials} == {f"@ssh-host-key:node{n}" for n in range(1, 5)}
    assert not set(copy.credentials) & set(Database(cluster_db).load().credentials)
    assert "ed25519" not in out.read_text()


def test_secrets_are_never_printed_and_a_readable_secrets_file_is_refused(cluster_db, tmp_path,
                                                                          monkeypatch, capsys):
    code, text, err = vlx(capsys, "db", "export", "--with-secrets")
    assert code == 2 and text == "" and "-o FILE" in err
    out = tmp_path / "cluster.toml"
    assert vlx(capsys, "db", "export", "-o", str(out), "--with-secrets")[0] == 0
    secrets = tmp_path / "cluster.secrets.toml"
    secrets.chmod(0o644)
    monkeypatch.setenv("VLX_DB", str(tmp_path / "copy.db"))
    code, _, err = vlx(capsys, "db", "import", str(out))
    assert code == 2 and "chmod 600" in err and str(secrets) in err
    assert not (tmp_path / "copy.db").exists() or Database(tmp_path / "copy.db").load().nodes == ()
