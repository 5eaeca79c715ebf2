"""Many DHCP clients booting at once, as the machines of a rack do: for bench/storm.py.

    python -m virtualinux.bench.dora_client MACS_FILE --rate 200 --timeout 30 [--retry 1]

Run inside a client namespace whose eth0 is on the replicas' segment. For each MAC (one a line)
it broadcasts a DISCOVER from port 68 with giaddr 0, like a PXE ROM, paced at `--rate` clients
a second; REQUESTs the first OFFER (naming its server); and counts the lease when the ACK comes.
A client with no OFFER (or no ACK) after `--retry` seconds sends the same transaction again
with secs 0, as udhcpc does. Prints one JSON line: packets sent, OFFERs and ACKs received,
leases, and the time from the first DISCOVER to the last ACK.

perfdhcp cannot play this part: it always sends as a relay (giaddr = its own address, replies
to its port 67), and relayed requests are answered as without balancing.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import sys
import time

from virtualinux.bootsvc import dhcp_wire as wire

BROADCAST = ("255.255.255.255", wire.SERVER_PORT)


def discover(mac: bytes, xid: int) -> bytes:
    return wire.encode(wire.Message(op=wire.BOOTREQUEST, xid=xid, chaddr=mac,
                                    flags=wire.BROADCAST_FLAG, options=(
                                        (wire.OPT_MESSAGE_TYPE, bytes([wire.DISCOVER])),)))


def request(mac: bytes, xid: int, server: bytes, address: bytes) -> bytes:
    return wire.encode(wire.Message(op=wire.BOOTREQUEST, xid=xid, chaddr=mac,
                                    flags=wire.BROADCAST_FLAG, options=(
                                        (wire.OPT_MESSAGE_TYPE, bytes([wire.REQUEST])),
                                        (wire.OPT_SERVER_ID, server),
                                        (wire.OPT_REQUESTED_IP, address))))


def run(macs: list[bytes], rate: float, timeout: float, retry: float) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    sock.bind(("0.0.0.0", wire.CLIENT_PORT))
    pending: dict[int, list] = {}    # xid -> [mac, packet now due, last sent, done]
    sent = offers = acks = retries = leases = 0
    started = time.monotonic()
    last_ack = started
    deadline = started + timeout
    next_client = 0
    # A new random xid per client and run, as real clients pick them: the replicas remember
    # recent transactions, and a reused one would look like a retransmission.
    first_xid = random.getrandbits(31)
    while time.monotonic() < deadline and (next_client < len(macs) or leases < len(macs)):
        now = time.monotonic()
        while next_client < len(macs) and now >= started + next_client / rate:
            xid = first_xid + next_client
            packet = discover(macs[next_client], xid)
            pending[xid] = [macs[next_client], packet, now, False]
            sock.sendto(packet, BROADCAST)
            sent += 1
            next_client += 1
        for waiting in pending.values():
            if not waiting[3] and now - waiting[2] >= retry:
                sock.sendto(waiting[1], BROADCAST)
                waiting[2] = now
                sent += 1
                retries += 1
        ready, _, _ = select.select([sock], [], [], 0.005)
        while ready:
            try:
                data = sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            # Every client hears every broadcast answer: read the xid and the message type
            # (our replicas put option 53 first) and decode only the OFFER it will take.
            if len(data) < wire.OPTIONS_START + 3 or data[0] != wire.BOOTREPLY:
                continue
            state = pending.get(int.from_bytes(data[4:8], "big"))
            if state is None:
                continue
            kind = data[242] if data[240] == wire.OPT_MESSAGE_TYPE else None
            if kind == wire.OFFER:
                offers += 1
                if state[1][242] == wire.DISCOVER:   # the first OFFER: take it
                    try:
                        reply = wire.decode(data)
                    except wire.MalformedPacket:
                        continue
                    server = reply.option(wire.OPT_SERVER_ID)
                    if server is None:      # no OFFER may lack it (RFC 2131 4.3.1): ignored
                        continue
                    state[1] = request(state[0], reply.xid, server, reply.yiaddr.packed)
                    state[2] = time.monotonic()
                    sock.sendto(state[1], BROADCAST)
                    sent += 1
            elif kind == wire.ACK:
                acks += 1
                if not state[3]:
                    state[3] = True
                    leases += 1
                    last_ack = time.monotonic()
    sock.close()
    return {"clients": len(macs), "sent": sent, "retries": retries, "offers": offers,
            "acks": acks, "leases": leases, "seconds": round(last_ack - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.dora_client")
    parser.add_argument("macs")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--retry", type=float, default=1.0)
    args = parser.parse_args(argv)
    with open(args.macs) as f:
        macs = [wire.parse_mac(line.strip()) for line in f if line.strip()]
    print(json.dumps(run(macs, args.rate, args.timeout, args.retry)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
