"""The TFTP boot-file service: read-only, serving the netboot tree and per-node files made from
the database (netboot.files), with blksize, timeout, tsize and windowsize (RFC 7440).

The request port is an asyncio datagram endpoint; each transfer gets a socket of its own
(a new TID, connected to the client) and runs on a transfer thread (bootsvc.tftp_window). A
bad request gets a TFTP error; a malformed packet is counted, logged (the first few of each
kind, with their source) and dropped. Start one from a test or the daemon with

    service = TftpService(replica, cluster, TftpService.Options(port=69))
    await service.start(); ...; service.reload(newer_cluster); ...; await service.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import mmap
import os
import socket
import time
from collections import Counter
from pathlib import Path

from virtualinux.netboot.files import BootFiles, DiskFile, FileMissing, RequestRefused
from virtualinux.vvcm import Cluster

from .service import Replica, Service, check_port
from .tftp_window import DEFAULT_SPIN, Transfer, TransferEngine
from .tftp_wire import (
    ERR_ACCESS,
    ERR_ILLEGAL,
    ERR_NOT_FOUND,
    ERR_UNDEFINED,
    MAX_BLKSIZE,
    MIN_BLKSIZE,
    MalformedPacket,
    Request,
    encode_error,
    negotiate,
    parse_request,
    to_netascii,
)

log = logging.getLogger(__name__)

TFTP_PORT = 69
MAX_TRANSFERS = 512              # a rack powering on at once fits many times over
MAX_NETASCII_SIZE = 16 << 20     # netascii is converted in memory: text files only
STOP_GRACE = 2.0                 # seconds running transfers get to finish on stop
# Transfer threads: by default one per CPU this process may run on, at most MAX_WORKERS. The
# GIL serialises their Python, but their send/recv system calls overlap on other CPUs; on one
# CPU extra threads only add GIL hand-offs: bench/tftp.py pinned to one CPU on a quiet machine,
# 20 and 50 lock-step clients, 4 threads gave 128 and 105 MB/s (6.4 and 7.3 ms CPU per MB),
# 1 thread 146 and 124 MB/s (4.4 and 4.6 ms; dnsmasq 150 and 136 MB/s, 4.9 and 5.8 ms).
MAX_WORKERS = 4
MAX_SPIN_US = 10_000


def default_workers() -> int:
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


WAIT_COUNTERS = ("spin_hits", "spin_misses", "sleeps")
LOGGED_PER_REASON = 5            # then only every 1000th, so a flood cannot fill the log


class TftpService(Service):
    name = "tftp"

    @dataclasses.dataclass(frozen=True)
    class Options:
        port: int = TFTP_PORT
        # The largest block size a client may negotiate (RFC 2348 allows up to 65464).
        max_blksize: int = MAX_BLKSIZE
        # Transfer threads; 0: one per CPU this process may use, at most MAX_WORKERS.
        workers: int = 0
        # Microseconds a transfer thread polls for the next ACK before it sleeps, while
        # transfers run (bootsvc.tftp_window says why); 0: sleep at once.
        spin_us: int = round(DEFAULT_SPIN * 1e6)

        def __post_init__(self) -> None:
            check_port(self.port)
            if not MIN_BLKSIZE <= self.max_blksize <= MAX_BLKSIZE:
                raise ValueError(f"max_blksize must be from {MIN_BLKSIZE} to {MAX_BLKSIZE}")
            if self.workers < 0:
                raise ValueError("workers must be 0 (one per CPU, at most "
                                 f"{MAX_WORKERS}) or more")
            if not 0 <= self.spin_us <= MAX_SPIN_US:
                raise ValueError(f"spin_us must be from 0 to {MAX_SPIN_US}")

    def __init__(self, replica: Replica, cluster: Cluster, options: Options | None = None):
        super().__init__(replica, cluster, options)
        self.options: TftpService.Options
        self.files = BootFiles(Path(replica.netboot_root), cluster)
        self.transfers: dict[tuple[str, int], Transfer] = {}
        self._engines: list[TransferEngine] = []
        self._stopped_waits: Counter[str] = Counter()     # of engines stopped
        self._endpoint: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._endpoint, _ = await self._loop.create_datagram_endpoint(
            lambda: _RequestPort(self),
            local_addr=(str(self.replica.address), self.options.port))
        self.port = self._endpoint.get_extra_info("sockname")[1]
        workers = self.options.workers or default_workers()
        self._engines = [TransferEngine(f"tftp-{i}", self.options.spin_us / 1e6)
                         for i in range(workers)]
        for engine in self._engines:
            engine.start()
        log.info("TFTP on %s:%d serving %s (gen %d)", self.replica.address, self.port,
                 self.replica.netboot_root, self.cluster.generation)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Take no new requests; give running transfers `grace` seconds to finish (a node
        half-way through its kernel should not start over), then end the rest."""
        if self._endpoint:
            self._endpoint.close()
            self._endpoint = None
        deadline = time.monotonic() + grace
        while self.transfers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for engine in self._engines:
            await asyncio.to_thread(engine.stop)
            self._stopped_waits.update({name: getattr(engine, name) for name in WAIT_COUNTERS})
        self._engines = []
        await asyncio.sleep(0)      # let the engines' last call_soon_threadsafe callbacks run
        self.transfers.clear()

    def reload(self, cluster: Cluster) -> None:
        super().reload(cluster)
        self.files.reload(cluster)

    def details(self) -> dict[str, object]:
        """Running transfers, and how the transfer threads waited for datagrams: spins that
        found one, spins that ran out, sleeps (bootsvc.tftp_window)."""
        waits = self._stopped_waits.copy()
        for engine in self._engines:
            waits.update({name: getattr(engine, name) for name in WAIT_COUNTERS})
        return {"transfers": len(self.transfers), **{name: waits[name] for name in WAIT_COUNTERS}}

    # -- requests --------------------------------------------------------------------------------

    def handle_request(self, packet: bytes, peer: tuple[str, int]) -> None:
        try:
            request = parse_request(packet)
        except MalformedPacket as err:
            self.drop("malformed", peer, str(err))
            return
        if peer in self.transfers:
            self.counters["duplicate_request"] += 1    # a retransmitted RRQ: already serving
            return
        self.counters["requests"] += 1
        if request.write:
            self.refuse(peer, ERR_ACCESS, "read-only server", "write", request.filename)
        elif request.mode not in ("octet", "netascii"):
            self.refuse(peer, ERR_ILLEGAL, f"unsupported mode {request.mode!r}", "bad_mode",
                        request.filename)
        elif len(self.transfers) >= MAX_TRANSFERS:
            self.refuse(peer, ERR_UNDEFINED, "server busy, retry", "busy", request.filename)
        else:
            self.serve(request, peer)

    def serve(self, request: Request, peer: tuple[str, int]) -> None:
        try:
            found = self.files.lookup(request.filename, peer[0])
            data = _contents(found, request.mode)
        except RequestRefused as err:
            self.refuse(peer, ERR_ACCESS, f"access violation: {err}", "refused",
                        request.filename)
            return
        except FileMissing:
            self.refuse(peer, ERR_NOT_FOUND, "file not found", "not_found", request.filename)
            return
        except (OSError, ValueError) as err:
            self.refuse(peer, ERR_NOT_FOUND, "file not readable", "unreadable",
                        f"{request.filename}: {err}")
            return
        options = negotiate(request, len(data), self.options.max_blksize)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((str(self.replica.address), 0))
            sock.connect(peer)
        except OSError as err:
            sock.close()
            self.refuse(peer, ERR_UNDEFINED, "cannot open a transfer socket", "socket_error",
                        str(err))
            return
        description = f"{request.filename} to {peer[0]}:{peer[1]}"
        transfer = Transfer(sock, data, options, self._finished_elsewhere, description)
        self.transfers[peer] = transfer
        log.info("RRQ %s from %s:%d: %d bytes, blksize %d, window %d (gen %d)",
                 request.filename, peer[0], peer[1], len(data), options.blksize,
                 options.windowsize, self.cluster.generation)
        # The least busy engine; the request port itself never blocks on a transfer.
        min(self._engines, key=lambda engine: len(engine.transfers)).submit(transfer)

    def _finished_elsewhere(self, transfer: Transfer, error: str | None) -> None:
        """Called on an engine's thread: the bookkeeping happens on the service's loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._finished, transfer, error)

    def _finished(self, transfer: Transfer, error: str | None) -> None:
        for peer, active in list(self.transfers.items()):
            if active is transfer:
                del self.transfers[peer]
        self.counters["retransmits"] += transfer.retransmits
        self.counters["malformed"] += transfer.malformed
        if error is None:
            self.counters["sent"] += 1
            self.counters["bytes_sent"] += transfer.size
            log.debug("sent %s", transfer.description)
        else:
            self.counters["failed"] += 1
            log.info("transfer of %s ended: %s", transfer.description, error)

    def refuse(self, peer: tuple[str, int], code: int, message: str, reason: str,
               detail: str) -> None:
        self.counters[reason] += 1
        self._log(reason, "refused %r from %s:%d: %s", detail, peer[0], peer[1], message)
        if self._endpoint:
            self._endpoint.sendto(encode_error(code, message), peer)

    def drop(self, reason: str, peer: tuple[str, int], detail: str) -> None:
        self.counters[reason] += 1
        self._log(reason, "dropped a packet from %s:%d: %s", peer[0], peer[1], detail)

    def _log(self, reason: str, message: str, *args: object) -> None:
        count = self.counters[reason]
        if count <= LOGGED_PER_REASON or count % 1000 == 0:
            log.warning(message + " (%s #%d)", *args, reason, count)


def _contents(found, mode: str):
    """The bytes to send: the generated file, or the disk file mapped read-only."""
    if isinstance(found, DiskFile):
        with open(found.path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            data = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) if size else b""
    else:
        data = found.data
    if mode == "netascii":
        if len(data) > MAX_NETASCII_SIZE:
            raise ValueError("too large for netascii mode, ask in octet mode")
        data = to_netascii(bytes(data))
    return data


class _RequestPort(asyncio.DatagramProtocol):
    def __init__(self, service: TftpService):
        self.service = service

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.service.handle_request(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for error packets we sent to clients that left: nothing to do.
        self.service.counters["icmp_error"] += 1


SERVICE = TftpService
