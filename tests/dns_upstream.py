"""A fake upstream DNS server for the DNS lab tests, run inside a namespace:

    python tests/dns_upstream.py --address 198.18.0.51 --spoof-from 198.18.0.61 [--silent]

It answers for example.test (and victim.other.test) over UDP and TCP, prints one line
`PROTO NAME TYPE` per query it receives (flushed, so the test counts upstream queries), and
misbehaves by name, the way an attacker or a big answer would:

- `nx*.example.test`: NXDOMAIN with an SOA (minimum 30);
- `tc.example.test`: over UDP an empty answer with TC set; over TCP the A record;
- `wrongid.*`, `wrongq.*`, `wrongsrc.*`: first a forged answer (A 198.51.100.66) with a wrong
  ID, for another question, or from the --spoof-from address; then the real one;
- `bailiwick.example.test`: the real answer plus a forged A for victim.other.test in the answer
  and additional sections;
- everything else: A 198.51.100.10, TTL 300 (victim.other.test: A 198.51.100.77).
With --silent it prints what it receives and never answers (a dead upstream).
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

FORGED = "198.51.100.66"
SOA = "ns.example.test. hostmaster.example.test. 1 3600 600 86400 30"


def answer(query: dns.message.Message, tcp: bool) -> dns.message.Message:
    name = query.question[0].name
    text = name.to_text().lower()
    reply = dns.message.make_response(query)
    if text.startswith("nx"):
        reply.set_rcode(dns.rcode.NXDOMAIN)
        reply.authority.append(dns.rrset.from_text("example.test.", 3600, "IN", "SOA", SOA))
        return reply
    if text == "tc.example.test." and not tcp:
        reply.flags |= dns.flags.TC
        return reply
    address = "198.51.100.77" if text == "victim.other.test." else "198.51.100.10"
    reply.answer.append(dns.rrset.from_text(name, 300, "IN", "A", address))
    if text.startswith("bailiwick."):
        forged = dns.rrset.from_text("victim.other.test.", 86400, "IN", "A", FORGED)
        reply.answer.append(forged)
        reply.additional.append(forged)
    return reply


def forged(query: dns.message.Message) -> dns.message.Message | None:
    text = query.question[0].name.to_text().lower()
    if text.startswith("wrongq."):
        other = dns.message.make_query("other.example.test", "A", id=query.id)
        reply = dns.message.make_response(other)
    elif text.startswith(("wrongid.", "wrongsrc.")):
        reply = dns.message.make_response(query)
        if text.startswith("wrongid."):
            reply.id = (query.id + 1) % 65536
    else:
        return None
    reply.answer.append(dns.rrset.from_text(reply.question[0].name, 86400, "IN", "A", FORGED))
    return reply


def serve_udp(sock: socket.socket, spoof: socket.socket, silent: bool) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        query = dns.message.from_wire(data)
        print("udp", query.question[0].name.to_text().lower(), query.question[0].rdtype,
              flush=True)
        if silent:
            continue
        fake = forged(query)
        if fake is not None:
            text = query.question[0].name.to_text().lower()
            (spoof if text.startswith("wrongsrc.") else sock).sendto(fake.to_wire(), peer)
        sock.sendto(answer(query, False).to_wire(), peer)


def serve_tcp(server: socket.socket, silent: bool) -> None:
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                length = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
                query = dns.message.from_wire(conn.recv(length, socket.MSG_WAITALL))
            except (struct.error, OSError, dns.exception.DNSException):
                continue
            print("tcp", query.question[0].name.to_text().lower(), query.question[0].rdtype,
                  flush=True)
            if not silent:
                data = answer(query, True).to_wire()
                conn.sendall(struct.pack(">H", len(data)) + data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--spoof-from", required=True)
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.address, 53))
    spoof = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spoof.bind((args.spoof_from, 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((args.address, 53))
    tcp.listen(16)
    threading.Thread(target=serve_tcp, args=(tcp, args.silent), daemon=True).start()
    print("ready", flush=True)
    serve_udp(udp, spoof, args.silent)


if __name__ == "__main__":
    sys.exit(main())
