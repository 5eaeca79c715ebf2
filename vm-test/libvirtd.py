"""A libvirtd per lab node: each in the node's network namespace and a mount namespace of its
own, with private /run/libvirt, /var/lib/libvirt, /etc/libvirt, /var/log/libvirt and
/var/cache/libvirt bind-mounted from a state directory (see ../shared/LAB.md), so two of them
run side by side on one machine as two nodes would.

Clients reach one by its unix socket from anywhere (`uri`), and the other libvirtds reach it
over TCP on the node's lab address (`tcp_uri`, no authentication: lab only), which is what a
peer-to-peer migration uses. `stop()` (or the namespace registry's close) ends both daemons.

How it starts, with no `ip` and no shell: `nsenter --net=NS unshare --mount --propagation
private python -m virtualinux.vm_test.libvirtd STATE`, whose `launch` (in the new
mount namespace) mounts a sysfs of the node's network namespace over /sys (so libvirt's
/sys/class/net shows the node's links, what `ip netns exec` did), bind-mounts the private
dirs with mount(2), starts virtlogd and execs libvirtd; both daemonise and keep that mount
namespace.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .netns import Namespace, Netns

PRIVATE_DIRS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "etc": "/etc/libvirt",
                "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}
START_TIMEOUT = 60.0


class LabLibvirtd:
    def __init__(self, ns: Namespace, address: str, state: Path):
        self.ns = ns
        self.address = address
        self.state = state

    @property
    def socket(self) -> Path:
        return self.state / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    def _write_config(self) -> None:
        for name in PRIVATE_DIRS:
            (self.state / name).mkdir(parents=True, exist_ok=True)
        etc = self.state / "etc"
        (etc / "libvirtd.conf").write_text(
            f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{self.address}"\n'
            f'auth_tcp = "none"\nauth_unix_rw = "none"\nhost_uuid = "{uuid.uuid4()}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        # root without dynamic ownership: a start takes ~0.5 s instead of ~4.5 s (LAB.md);
        # no cgroups here; migrations arrive on the node's own lab address.
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'cgroup_controllers = [ ]\nsecurity_driver = "none"\n'
            f'migration_address = "{self.address}"\nmigration_host = "{self.address}"\n')

    def start(self) -> None:
        self._write_config()
        for target in PRIVATE_DIRS.values():
            os.makedirs(target, exist_ok=True)  # bind-mount points (libvirt's own dirs)
        launcher = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                    __name__, str(self.state)]
        result = self.ns.run(launcher, check=False, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"libvirtd in {self.ns.name} did not start: {result.stderr}")
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd in {self.ns.name} made no socket: "
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        log = self.state / "log" / "libvirtd.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else ""

    def stop(self) -> None:
        for name in ("libvirtd", "virtlogd"):
            pidfile = self.state / f"{name}.pid"
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


def lab_nodes(registry: Netns, state: Path, count: int = 2) -> list[LabLibvirtd]:
    """`count` lab nodes 198.18.0.11, .12, ... on one segment (a bridge in a hub namespace),
    each a namespace with its libvirtd running. The caller stops them (and `registry.close()`
    removes the namespaces); if one fails to start, those started are stopped here."""
    hub = registry.namespace("hub")
    bridge = registry.bridge(hub)
    daemons: list[LabLibvirtd] = []
    try:
        for index in range(1, count + 1):
            ns = registry.namespace(f"n{index}")
            address = f"198.18.0.{10 + index}"
            registry.plug(hub, bridge, ns, address=f"{address}/24")
            daemons.append(LabLibvirtd(ns, address, state / f"node{index}"))
            daemons[-1].start()
    except BaseException:
        for daemon in daemons:
            daemon.stop()
        raise
    return daemons


# mount(2) flags (linux/mount.h) and umount2's MNT_DETACH.
MS_BIND, MNT_DETACH = 0x1000, 2


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                  flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def launch(state: Path) -> None:
    """In a fresh mount namespace inside the node's network namespace: this namespace's sysfs
    on /sys, the private dirs over libvirt's, then virtlogd and (exec) libvirtd."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(b"/sys", MNT_DETACH) != 0:     # the host's sysfs shows the host's links
        err = ctypes.get_errno()
        raise OSError(err, f"umount /sys: {os.strerror(err)}")
    _mount("sysfs", "/sys", "sysfs", 0)
    for name, target in PRIVATE_DIRS.items():
        _mount(str(state / name), target, None, MS_BIND)
    subprocess.run(["virtlogd", "-d", "-p", str(state / "virtlogd.pid")], check=True)
    os.execvp("libvirtd", ["libvirtd", "-d", "--listen", "-p", str(state / "libvirtd.pid")])


if __name__ == "__main__":
    launch(Path(sys.argv[1]))
