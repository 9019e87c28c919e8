"""Reverse DNS asked of the DNS server itself: the names a PTR query for an address returns.

The system resolver (``socket.gethostbyaddr``) reads /etc/hosts first, and under the Docker engine that
file maps a container's address to its id only; Docker's embedded DNS server (the ``nameserver`` of the
container's /etc/resolv.conf) answers the same address with ``<container name>.<network>.``, the name
that carries a compose replica's index. Blocking: call in a thread."""

from __future__ import annotations

import dns.exception
import dns.resolver
import dns.reversename

RESOLV_CONF = "/etc/resolv.conf"


def ptr_names(address: str, resolv_conf: str = RESOLV_CONF, port: int = 53, timeout: float = 2.0) -> list[str]:
    """The PTR names of ``address`` (no trailing dot) from the name servers of ``resolv_conf``; [] when
    there are none, the address has no record, or no server answers within ``timeout`` seconds."""
    try:
        resolver = dns.resolver.Resolver(filename=resolv_conf)
    except (OSError, dns.exception.DNSException):  # no readable resolv.conf, or one without a nameserver
        return []
    resolver.port = port
    try:
        answer = resolver.resolve(dns.reversename.from_address(address), "PTR", lifetime=timeout)
    except (dns.exception.DNSException, OSError, ValueError):
        return []
    return [rr.target.to_text(omit_final_dot=True) for rr in answer]
