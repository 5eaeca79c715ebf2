"""etcd members as processes in lab namespaces, for the store's lab tests and bench/store.py.

Every member runs `vlx db serve` (which execs Debian's etcd) in its own namespace on one
bridge, with its data in a temporary directory and long Raft timeouts (the machine is shared:
etcd's 100 ms / 1 s defaults make a loaded 2-core box hold elections). Clients run `vlx` in a
namespace too: a lab address is never reached from the host's namespace.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
from pathlib import Path

from virtualinux.vm_test.netns import Namespace, Netns
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm.command import vlx_command
from virtualinux.vvcm.model import STORE_CLIENT_PORT

VLX = vlx_command()
HEARTBEAT_MS = 250
ELECTION_MS = 2500


@dataclasses.dataclass
class Member:
    name: str
    address: str
    ns: Namespace
    data_dir: Path
    log: Path
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{STORE_CLIENT_PORT}"


class Lab:
    """A bridge, etcd members, and namespaces for writers, replicas and DHCP clients."""

    def __init__(self, netns: Netns, tmp: Path):
        self.netns = netns
        self.tmp = tmp
        self.hub = netns.namespace("hub")
        self.bridge = netns.bridge(self.hub)
        self.members: list[Member] = []
        self.timing = (HEARTBEAT_MS, ELECTION_MS)
        # ca.crt, eN.crt/.key of every member and client.crt/.key (`vlx db tls`): TLS for all
        self.tls: Path | None = None
        self.processes: list[subprocess.Popen] = []

    def plug(self, role: str, address: str | None = None, mac: str | None = None) -> Namespace:
        ns = self.netns.namespace(role)
        self.netns.plug(self.hub, self.bridge, ns, address=f"{address}/24" if address else None,
                        mac=mac)
        return ns

    def etcd(self, count: int, heartbeat_ms: int = HEARTBEAT_MS,
             election_ms: int = ELECTION_MS, tls: Path | None = None) -> str:
        """`count` members, started and healthy; returns the store URL naming them all."""
        self.timing = (heartbeat_ms, election_ms)
        self.tls = tls
        for i in range(1, count + 1):
            self.add(f"e{i}", f"198.18.0.{30 + i}")
        for member in self.members:
            self.start(member)
        self.admin = self.plug("admin", "198.18.0.30")
        wait_for(lambda: self.healthy(self.members), 60, "the etcd members to be healthy",
                 interval=0.5)
        return self.url

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def add(self, name: str, address: str) -> Member:
        """A member not started yet (for `vlx db member add`, then `start(..., join=True)`)."""
        member = Member(name, address, self.plug(name, address), self.tmp / f"etcd-{name}",
                        self.tmp / f"etcd-{name}.log")
        self.members.append(member)
        return member

    def start(self, member: Member, join: bool = False) -> None:
        scheme = "https" if self.tls else "http"
        initial = ",".join(f"{m.name}={scheme}://{m.address}:2380" for m in self.members)
        tls = ["--tls", str(self.tls)] if self.tls else []
        member.process = member.ns.popen(
            [*VLX, "db", "serve", "--name", member.name, "--listen", member.address,
             "--initial-cluster", initial, "--data-dir", str(member.data_dir),
             "--heartbeat-ms", str(self.timing[0]), "--election-ms", str(self.timing[1]), *tls,
             *(["--join"] if join else [])],
            stdout=member.log.open("a"), stderr=subprocess.STDOUT)

    def kill(self, member: Member) -> None:
        assert member.process is not None
        member.process.send_signal(signal.SIGKILL)
        member.process.wait(10)

    def etcdctl_args(self, members: list[Member]) -> list[str]:
        scheme = "https" if self.tls else "http"
        tls = ([f"--cacert={self.tls / 'ca.crt'}", f"--cert={self.tls / 'client.crt'}",
                f"--key={self.tls / 'client.key'}"] if self.tls else [])
        return ["etcdctl", "--endpoints",
                ",".join(f"{scheme}://{m.endpoint}" for m in members), *tls]

    def healthy(self, members: list[Member]) -> bool:
        result = self.admin.run([*self.etcdctl_args(members), "--command-timeout=3s",
                                 "endpoint", "health"], check=False)
        return result.returncode == 0

    def vlx(self, *argv: str, ns: Namespace | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return (ns or self.admin).run([*VLX, "--store", self.url, *argv], check=False,
                                      timeout=timeout, env=env)

    def etcdctl(self, *argv: str) -> str:
        return self.admin.run([*self.etcdctl_args(self.members), *argv]).stdout

    def popen(self, ns: Namespace, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        process = ns.popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, **kwargs)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes + [m.process for m in self.members if m.process]:
            if process.poll() is None:
                process.kill()
            process.wait(10)
