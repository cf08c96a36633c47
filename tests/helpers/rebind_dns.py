"""A tiny DNS server on loopback whose answers change from one query to the next (DNS rebinding).

Built on dnspython's message parsing; UDP only, A and AAAA. ``answers[name]`` is a list of
address tuples: the n-th A/AAAA query for a name gets entry n (the last one repeats). TTL 0, so
no cache in between may keep an earlier answer.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from helpers.net import LoopbackServer


class RebindingDns(LoopbackServer):
    def __init__(self, answers: dict[str, list[tuple[str, ...]]], *, silent: bool = False) -> None:
        self.answers = {k.rstrip(".").lower(): v for k, v in answers.items()}
        self.silent = silent  # never answer: for resolver timeouts
        self.queries: Counter[tuple[str, str]] = Counter()  # (name, type) → count
        self._a_seen: Counter[str] = Counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        super().__init__(sock)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - not DNS: ignore, like a real server would
                continue
            q = query.question[0]
            name = q.name.to_text().rstrip(".").lower()
            rdtype = dns.rdatatype.to_text(q.rdtype)
            self.queries[(name, rdtype)] += 1
            if self.silent:
                continue
            self._sock.sendto(self._answer(query, name, q.rdtype).to_wire(), peer)

    def _answer(self, query, name: str, rdtype) -> dns.message.Message:
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if name not in self.answers:
            resp.set_rcode(dns.rcode.NXDOMAIN)
            return resp
        # A and AAAA queries for one lookup come together: both read the same entry, counted by A.
        seq = self.answers[name]
        n = self._a_seen[name] - (0 if rdtype == dns.rdatatype.A else 1)
        if rdtype == dns.rdatatype.A:
            self._a_seen[name] += 1
        addrs = seq[min(max(n, 0), len(seq) - 1)]
        version = 4 if rdtype == dns.rdatatype.A else 6
        picked = [a for a in addrs if ipaddress.ip_address(a).version == version]
        if picked and rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            resp.answer.append(dns.rrset.from_text_list(name + ".", 0, dns.rdataclass.IN, rdtype, picked))
        return resp
