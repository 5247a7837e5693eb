"""A tiny real DNS server on 127.0.0.1 (UDP, port from the OS) that tests control.

It answers from `records` ((name, type) -> rdata texts, e.g. `("_http._tcp.llm.test.",
"SRV") -> ["0 0 8001 b1.test."]`), with NXDOMAIN for a name it does not know; with
`additional`, an SRV answer carries its targets' A records, as Kubernetes' DNS does.
`mode` breaks it: "servfail" answers SERVFAIL, "drop" never answers (a timeout).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass
class DnsServer:
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    additional: bool = False
    mode: str = "answer"  # "answer" | "servfail" | "drop"
    queries: list[tuple[str, str]] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=("127.0.0.1", 0))
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name, rdtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if self.mode == "drop":
            return None
        response = dns.message.make_response(query)
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        texts = self.records.get((name, rdtype))
        if texts is None:
            known = any(n == name for n, _ in self.records)
            if not known:
                response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()  # a known name without this type: NOERROR, no answer
        response.answer.append(dns.rrset.from_text_list(question.name, 5, dns.rdataclass.IN, question.rdtype,
                                                        texts))
        if self.additional and rdtype == "SRV":
            for text in texts:
                target = text.split()[-1]
                addresses = self.records.get((target, "A"))
                if addresses:
                    response.additional.append(dns.rrset.from_text_list(dns.name.from_text(target), 5,
                                                                        dns.rdataclass.IN, dns.rdatatype.A,
                                                                        addresses))
        return response.to_wire()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        reply = self.server.answer(data)
        if reply is not None and self.server.transport is not None:
            self.server.transport.sendto(reply, addr)
