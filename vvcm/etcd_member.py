"""Running etcd members for the replicated store: the command line of one member, and the
membership calls (`vlx db serve`, `vlx db member list|add|remove`).

A member is Debian's `etcd` (etcd-server, 3.4) with its data under /var/lib/virtualinux/etcd/NAME.
Its Raft timing comes from the cluster settings (`store_heartbeat_ms`, `store_election_ms`),
read from the local copy of the database when there is one, else the model's defaults. History
is compacted automatically (AUTO_COMPACTION), since every change writes a new snapshot and the
old ones are deleted but kept in etcd's history until compaction; the backend quota is raised
from 2 GiB to QUOTA_BYTES for the same reason. No request or transaction limit is raised: the
store keeps every request within the defaults (store_etcd).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import VlxError
from .model import STORE_CLIENT_PORT, Settings

if TYPE_CHECKING:   # the etcd client is imported only when a store is opened
    from .store_etcd import EtcdStore

DATA_ROOT = Path("/var/lib/virtualinux/etcd")
CLIENT_PORT = STORE_CLIENT_PORT
PEER_PORT = 2380
AUTO_COMPACTION = ("revision", "1000")    # keep the last 1,000 revisions of history
QUOTA_BYTES = 8 * 1024**3


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    address: ipaddress.IPv4Address
    initial_cluster: tuple[tuple[str, str], ...]    # (name, peer URL) of every member
    join: bool = False                              # joining a running cluster (member add)
    data_dir: Path | None = None
    heartbeat_ms: int = Settings.store_heartbeat_ms     # the settings' defaults
    election_ms: int = Settings.store_election_ms
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT
    # ca.crt, NAME.crt, NAME.key (`vlx db tls member`): TLS for clients and peers, and only
    # holders of a certificate of the cluster CA get in. None: plain HTTP (the lab).
    tls_dir: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_dir else "http"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.peer_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.client_port}"

    def tls_flags(self, root: Path = Path("/")) -> list[str]:
        """etcd's TLS flags; `root` is where the files are looked for (a node's root seen
        from a test or an image build), the flags name them as the member sees them."""
        if self.tls_dir is None:
            return []
        ca, cert, key = (str(self.tls_dir / "ca.crt"), str(self.tls_dir / f"{self.name}.crt"),
                         str(self.tls_dir / f"{self.name}.key"))
        missing = [path for path in (ca, cert, key)
                   if not (root / path.lstrip("/")).is_file()]
        if missing:
            raise VlxError(f"missing {', '.join(missing)} (`vlx db tls member {self.name} "
                           f"--ip {self.address} --out {self.tls_dir}` writes them)", "--tls")
        return ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
                "--client-cert-auth", "--peer-cert-file", cert, "--peer-key-file", key,
                "--peer-trusted-ca-file", ca, "--peer-client-cert-auth"]

    def command(self, etcd: str = "etcd", root: Path = Path("/")) -> list[str]:
        """The etcd command line of this member (`root`: see tls_flags)."""
        if self.election_ms < 5 * self.heartbeat_ms:
            raise VlxError(f"election timeout {self.election_ms} ms is under 5 heartbeats of "
                           f"{self.heartbeat_ms} ms (etcd refuses that)")
        cluster = self.initial_cluster or ((self.name, self.peer_url),)
        if self.name not in dict(cluster):
            raise VlxError(f"--initial-cluster does not name this member {self.name!r}")
        data_dir = self.data_dir or DATA_ROOT / self.name
        return [etcd, "--name", self.name, "--data-dir", str(data_dir),
                "--listen-client-urls", self.client_url,
                "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", ",".join(f"{name}={url}" for name, url in cluster),
                "--initial-cluster-state", "existing" if self.join else "new",
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_ms),
                "--auto-compaction-mode", AUTO_COMPACTION[0],
                "--auto-compaction-retention", AUTO_COMPACTION[1],
                "--quota-backend-bytes", str(QUOTA_BYTES), *self.tls_flags(root)]


def parse_initial_cluster(text: str) -> tuple[tuple[str, str], ...]:
    """NAME=http://IP:PORT,... as etcd's --initial-cluster takes it."""
    members = []
    for part in text.split(","):
        name, sep, url = part.strip().partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise VlxError(f"{part.strip()!r} is not NAME=http://IP:PORT", "--initial-cluster")
        members.append((name, url))
    return tuple(members)


def members(store: EtcdStore) -> list[dict[str, Any]]:
    return [{"id": int(m.get("ID", 0)), "name": m.get("name", ""),
             "peer_urls": list(m.get("peerURLs", [])),
             "client_urls": list(m.get("clientURLs", []))}
            for m in store.call(lambda client: client.members())]


def add_member(store: EtcdStore, peer_url: str) -> int:
    """Announce a new member (etcd's MemberAdd) before it starts with --join; its id."""
    # etcd3gw wraps member list but not add/remove: its `post` sends the same v3 JSON call.
    result = store.call(lambda c: c.post(c.get_url("/cluster/member/add"),
                                          json={"peerURLs": [peer_url]}), writing=True)
    return int(result["member"]["ID"])


def remove_member(store: EtcdStore, name: str) -> int:
    found = [m for m in members(store) if m["name"] == name]
    if not found:
        raise VlxError(f"{store.name} has no member named {name!r}")
    member_id = found[0]["id"]
    store.call(lambda c: c.post(c.get_url("/cluster/member/remove"),
                                 json={"ID": str(member_id)}), writing=True)
    return member_id
