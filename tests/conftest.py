"""Shared fixtures: a fresh database per test, and network namespaces that are always removed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import hypothesis
import pytest
from virtualinux.vm_test.netns import Netns
from virtualinux.vvcm.cli import main
from virtualinux.vvcm.db import Database

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster.toml"

# Fuzz tests assert outcomes, never speed: hypothesis's per-example deadline (200 ms) failed
# them at random on a loaded 2-core machine.
hypothesis.settings.register_profile("virtualinux", deadline=None)
hypothesis.settings.load_profile("virtualinux")


def pytest_collection_modifyitems(config, items):
    """Lab tests need root; anywhere else they are skipped with the reason printed."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab test: needs root (network namespaces, QEMU, tgt)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def db_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cluster.db"
    monkeypatch.setenv("VLX_DB", str(path))
    return path


@pytest.fixture
def db(db_path) -> Database:
    return Database.create(db_path)


@pytest.fixture
def netns():
    """A registry of namespaces; everything it made is gone after the test, pass or fail."""
    registry = Netns(prefix="vt")
    try:
        yield registry
    finally:
        registry.close()


def vlx(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `vlx ARGV` in this process: exit code, stdout, stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing programs {missing}: `make test` installs them "
                    "(debian-packages.txt)")


@contextlib.contextmanager
def dnsmasq_dhcp(netns, leases: Path, host: str):
    """A hub namespace with a bridge at 198.18.0.254/24, a tap on it and dnsmasq handing out
    DHCP (`host` is a dhcp-host entry MAC,IP,NAME): yields (hub, tap); dnsmasq always stops."""
    require("dnsmasq")
    hub = netns.namespace("hub")
    bridge = netns.bridge(hub)
    hub.add_address(bridge, "198.18.0.254/24")
    tap = netns.tap(hub, bridge, "tap0")
    dnsmasq = hub.popen(["dnsmasq", "--keep-in-foreground", "--port=0", "--no-resolv",
                         "--no-hosts", f"--interface={bridge}", "--bind-interfaces",
                         f"--dhcp-leasefile={leases}", "--pid-file",
                         "--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,2m",
                         f"--dhcp-host={host}"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield hub, tap
    finally:
        dnsmasq.terminate()
        dnsmasq.wait(timeout=10)
