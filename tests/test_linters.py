"""ruff and mypy run as tests, with their settings in pyproject.toml (as mkosi does)."""

import os
import subprocess
import sys
import tomllib

from .conftest import ROOT


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing(tmp_path):
    """Over every package of the checkout, under its installed name: the folders are linked
    into a `virtualinux/` tree (vm-test/ is virtualinux.vm_test), since mypy cannot follow the
    editable install's import hook."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = config["tool"]["setuptools"]["package-dir"]
    tree = tmp_path / "virtualinux"
    tree.mkdir()
    packages = []
    for package, folder in folders.items():
        name = package.removeprefix("virtualinux.")
        if "." not in name:     # a subpackage (vvcm.cli) comes with its parent
            (tree / name).symlink_to(ROOT / folder)
            packages += ["-p", package]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), *packages],
        env={**os.environ, "MYPYPATH": str(tmp_path)}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
