"""Static seeds: peers named on the command line (``--seed HOST:PORT``), probed until they answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gossipfl.discovery.probing import Prober


def parse_hostport(text: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT" (an IPv6 host in brackets); ValueError if it is not one."""
    host, sep, port_s = text.strip().rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"seed {text!r}: expected host:port with a port from 1 to 65535")
    return host.strip("[]"), int(port_s)


class SeedDiscovery:
    """Static peers: learn each seed's id and task from its /v1/status, retrying every round until it
    answers (a seed was named by a person, so one that does not answer is worth a warning, once). A seed
    of another task or cluster is listed under ignored peers with the reason."""

    def __init__(self, seeds: Iterable[str], *, prober: Prober, log: logging.LoggerAdapter) -> None:
        scheme = prober.membership.scheme
        self.urls = [f"{scheme}://{h}:{p}" for h, p in map(parse_hostport, seeds)]
        self.pending = list(self.urls)
        self.prober = prober
        self.log = log
        self._warned: set[str] = set()

    async def round(self) -> None:
        """Probe the seeds not found yet, all at once."""
        if not self.pending:
            return
        results = await asyncio.gather(*(self._probe(u) for u in self.pending))
        self.pending = [u for u, found in zip(self.pending, results, strict=True) if not found]

    async def _probe(self, url: str) -> bool:
        result = await self.prober.probe(url, "static")
        if result == "unreachable":
            if url not in self._warned:
                self._warned.add(url)
                self.log.warning("seed %s does not answer (%s); retrying", url, self.prober.last_error or "no reply")
            return False
        if result == "ignored" and self.prober.peers.shunned(url):
            return False  # it failed authentication: asked again once its time out is over
        if url in self._warned:
            self.log.info("seed %s answers now", url)
        return True
