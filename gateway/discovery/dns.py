"""DNS discovery with dnspython's asyncio resolver: A, AAAA or SRV records.

SRV: each record's target is looked up in the answer's additional section (a
Kubernetes headless Service sends it along) or else resolved (A, then AAAA); every
address of a target becomes an endpoint on the record's port, named
`target:port` (the target's address when it has several). Priorities and weights
are not used: every target is an endpoint, the picker spreads the load.

Names: one ending in a dot is absolute; with the system resolver, another goes
through resolv.conf's search list as any lookup in the pod would (so
`_http._tcp.vllm-headless` finds the Service in the gateway's namespace).

An answer is the truth, an empty one too (NXDOMAIN or no records: a headless
Service scaled to zero): the endpoints it no longer names drain and go. A failure
to get an answer (timeout, SERVFAIL, refused, no nameserver) is a `DiscoveryError`:
the cluster keeps its last known endpoints rather than losing them to a resolver
hiccup. So does an SRV answer none of whose targets resolves.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.discovery.config import DnsDiscoveryConfig, EndpointTemplate, parse_nameserver
from gateway.discovery.endpoints import DiscoveryError, Found, address_endpoint
from gateway.endpoint_config import EndpointConfig


class DnsSource:
    def __init__(self, config: DnsDiscoveryConfig, template: EndpointTemplate) -> None:
        self.config = config
        self.template = template
        self._resolver: dns.asyncresolver.Resolver | None = None

    def resolver(self) -> dns.asyncresolver.Resolver:
        """The configured nameservers, or the system's (/etc/resolv.conf, read once)."""
        if self._resolver is None:
            cfg = self.config
            if cfg.nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(text))
                                        for text in cfg.nameservers]
            else:
                try:
                    resolver = dns.asyncresolver.Resolver()
                except dns.exception.DNSException as exc:  # no usable /etc/resolv.conf
                    raise DiscoveryError(f"no system resolver: {exc}") from None
                resolver.use_search_by_default = True
            resolver.timeout = resolver.lifetime = cfg.timeout
            self._resolver = resolver
        return self._resolver

    async def find(self) -> Found:
        cfg = self.config
        try:
            if cfg.record == "SRV":
                return await self._srv()
            assert cfg.port is not None
            answer = await self.resolver().resolve(cfg.name, cfg.record)
            addresses = sorted({rr.address for rr in answer})
            return Found([address_endpoint(self.template, a, cfg.port) for a in addresses])
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            return Found([], [f"{cfg.record} {cfg.name}: {_describe(exc)}"])
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"{cfg.record} {cfg.name}: {_describe(exc)}") from None

    async def _srv(self) -> Found:
        answer = await self.resolver().resolve(self.config.name, "SRV")
        known = _additional_addresses(answer)
        found: dict[str, EndpointConfig] = {}
        skipped: list[str] = []
        for rr in sorted(answer, key=lambda r: (str(r.target), r.port)):
            if rr.target == dns.name.root:  # "." : the service is explicitly not available there
                continue
            addresses = known.get(rr.target)
            if addresses is None:
                try:
                    addresses = await self._addresses(rr.target)
                except dns.exception.DNSException as exc:
                    skipped.append(f"{rr.target}:{rr.port}: {_describe(exc)}")
                    continue
            name = rr.target.to_text(omit_final_dot=True) if len(addresses) == 1 else None
            for address in addresses:
                endpoint = address_endpoint(self.template, address, rr.port, name)
                found.setdefault(endpoint.id, endpoint)
        if not found and skipped:
            raise DiscoveryError(f"SRV {self.config.name}: no target resolved to an address ({'; '.join(skipped)})")
        return Found(list(found.values()), skipped)

    async def _addresses(self, target: dns.name.Name) -> list[str]:
        try:
            answer = await self.resolver().resolve(target, "A")
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            answer = await self.resolver().resolve(target, "AAAA")
        return sorted({rr.address for rr in answer})


def _additional_addresses(answer: dns.resolver.Answer) -> dict[dns.name.Name, list[str]]:
    """Target name -> addresses from the response's additional section."""
    found: dict[dns.name.Name, set[str]] = {}
    response = answer.response
    for rrset in getattr(response, "additional", []):
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found.setdefault(rrset.name, set()).update(rr.address for rr in rrset)
    return {name: sorted(addresses) for name, addresses in found.items()}


def _describe(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "no such name (NXDOMAIN)"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no records"
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
