"""DNS discovery: every few seconds, resolve a name to all its A records; each address is a peer on the
same port. This covers a compose service scaled to N replicas and a Kubernetes headless Service, where
multicast does not reach. A name that stops resolving is logged and retried, never fatal."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from gossipfl.common.retry import patiently
from gossipfl.discovery.peers import PeerTable
from gossipfl.discovery.probing import Prober

Resolver = Callable[[str], Awaitable[list[str]]]
SOURCE = "dns"
START_PATIENCE_S = 60.0  # at start, a name that does not resolve yet is asked again for this long


class DnsError(Exception):
    """The name does not resolve (raised only by the check at start)."""


async def resolve_ipv4(name: str) -> list[str]:
    """All IPv4 addresses of ``name`` (the system resolver: /etc/hosts, then DNS), sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class DnsDiscovery:
    def __init__(
        self,
        name: str,
        port: int,
        *,
        prober: Prober,
        peers: PeerTable,
        log: logging.LoggerAdapter,
        interval: float = 5.0,
        resolve: Resolver = resolve_ipv4,
    ) -> None:
        self.name = name
        self.port = port
        self.prober = prober
        self.peers = peers
        self.log = log
        self.interval = interval
        self.resolve = resolve
        self._self_urls: set[str] = set()
        self._failing = False

    async def check(self, patience: float = START_PATIENCE_S) -> list[str]:
        """Resolve at start, asking again for up to ``patience`` seconds: a new pod's own record in a
        headless Service, or a new container's in compose, can take a while to appear. A name that still
        does not resolve then is a configuration error (DnsError)."""

        async def attempt() -> tuple[list[str] | None, str]:
            try:
                addrs = await self.resolve(self.name)
            except OSError as e:
                return None, str(e.strerror or e)
            return addrs or None, "no IPv4 address"

        def first_miss(reason: str) -> None:
            self.log.warning("dns-name %s does not resolve yet (%s): retrying for up to %.0f s", self.name, reason,
                             patience)  # fmt: skip

        addrs, reason, misses = await patiently(attempt, patience, first_miss)
        if addrs is None:
            raise DnsError(f"dns-name {self.name!r} does not resolve ({reason}) after {patience:.0f} s")
        if misses:
            self.log.info("dns-name %s resolves now", self.name)
        return addrs

    async def round(self) -> None:
        """One lookup: add the addresses not known yet, drop DNS-learned peers whose address is gone."""
        try:
            addrs = await self.resolve(self.name)
        except OSError as e:
            if not self._failing:
                self.log.warning("dns-name %s does not resolve (retrying): %s", self.name, e.strerror or e)
            self._failing = True
            return
        if self._failing:
            self.log.info("dns-name %s resolves again", self.name)
            self._failing = False
        urls = {f"{self.prober.membership.scheme}://{a}:{self.port}" for a in addrs}
        for peer in self.peers.all():
            if peer.source == SOURCE and peer.url not in urls:
                self.peers.remove(peer.id)
                self.log.info("peer %s left %s (%s)", peer.id, self.name, peer.url)
        known = {p.url for p in self.peers.all()} | self._self_urls
        for url in sorted(urls - known):
            if await self.prober.probe(url, SOURCE) == "self":
                self._self_urls.add(url)
