"""`make lab` / `make test` leave `vlx` on PATH as the README writes it (a link in BINDIR),
without ever replacing someone else's `vlx`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / ".venv" / "bin" / "vlx"


def link(bindir: Path) -> str:
    # -o: take the venv as installed (this test runs in it), so make only links.
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed",
                           "vlx-on-path", f"BINDIR={bindir}"],
                          capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture(autouse=True)
def needs_make_and_the_venv():
    if shutil.which("make") is None or not OURS.exists():
        pytest.skip("needs make and the project's .venv")


def test_vlx_is_linked_onto_path_once(tmp_path):
    bindir = tmp_path / "bin"
    assert link(bindir) == f"linked {bindir}/vlx -> {OURS}\n"
    assert os.readlink(bindir / "vlx") == str(OURS)
    assert link(bindir) == ""              # idempotent: nothing to do, nothing said
    found = shutil.which("vlx", path=str(bindir))
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("vlx ")


def test_a_dangling_link_is_replaced_and_a_foreign_vlx_is_kept(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vlx").symlink_to(tmp_path / "gone" / "vlx")
    assert link(bindir).startswith("linked ")
    assert os.readlink(bindir / "vlx") == str(OURS)
    (bindir / "vlx").unlink()
    (bindir / "vlx").write_text("#!/bin/sh\n")
    said = link(bindir)
    assert "not this checkout's" in said and f"run {OURS}" in said
    assert (bindir / "vlx").read_text() == "#!/bin/sh\n"
