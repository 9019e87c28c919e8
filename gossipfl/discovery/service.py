"""Every way a node learns about peers (mDNS, static seeds, DNS, peer exchange, inbound callers), started
and stopped together. The node supervises the periodic rounds this returns; nothing here trains or merges."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from zeroconf import NonUniqueNameException
from zeroconf.asyncio import AsyncZeroconf

from gossipfl.discovery.dns import DnsDiscovery, DnsError
from gossipfl.discovery.identity import Identity
from gossipfl.discovery.mdns import MdnsDiscovery, advertised_addresses, make_zeroconf, mdns_interfaces
from gossipfl.discovery.peers import PeerTable
from gossipfl.discovery.pex import PeerExchange
from gossipfl.discovery.probing import Prober
from gossipfl.discovery.seeds import SeedDiscovery
from gossipfl.security.membership import Membership

SEED_RETRY_S = 5.0
MAX_INBOUND_PROBES = 16  # unknown callers being identified at once; more wait for their next call
UNREACHABLE_S = 60.0  # an inbound caller that could not be reached back is not probed again for this long
MAX_UNREACHABLE = 1024  # addresses remembered as unreachable (the oldest is forgotten first)


class DiscoveryError(Exception):
    """Discovery cannot start as configured (mDNS interface missing, id in use, DNS name unknown)."""


@dataclass(frozen=True)
class DiscoverySettings:
    backends: tuple[str, ...]  # of "mdns", "dns" (seeds and peer exchange run whenever they have work)
    host: str  # the address the node listens on (mDNS stays on it unless interfaces are given)
    mdns_interfaces: tuple[str, ...]  # empty: the interface of host, or all when host is 0.0.0.0
    seeds: tuple[str, ...]  # HOST:PORT
    dns_name: str | None
    dns_interval: float
    pex_interval: float
    rng_seed: int  # seeds the choice of peer-exchange partners


@dataclass(frozen=True)
class Round:
    """A periodic discovery round for the node to supervise."""

    name: str
    interval: float
    work: Callable[[], Awaitable[None]]


class Discovery:
    def __init__(
        self,
        settings: DiscoverySettings,
        *,
        node_id: str,
        port: int,
        identity: Identity,
        peers: PeerTable,
        session_factory: Callable[[], aiohttp.ClientSession | None],
        log: logging.LoggerAdapter,
        zeroconf: AsyncZeroconf | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.port = port
        self.identity = identity
        self.peers = peers
        self.log = log
        self._session_factory = session_factory
        self._shared_zc = zeroconf
        self._own_zc: AsyncZeroconf | None = None
        self.mdns: MdnsDiscovery | None = None
        self._closed = False
        self._probing: set[str] = set()  # addresses of inbound peers being identified
        # inbound callers that could not be reached at their source address (behind NAT, or a firewall that
        # lets them call out only) -> when to try again: until then their calls are answered, not probed
        self.unreachable: dict[str, float] = {}
        self.clock: Callable[[], float] = time.monotonic
        self._tasks: set[asyncio.Task] = set()
        self.prober = Prober(
            identity=identity, peers=peers, session_factory=session_factory, log=log, membership=membership
        )

    @property
    def tasks(self) -> list[asyncio.Task]:
        """Probes of inbound callers still running (the node waits for them when it stops)."""
        return list(self._tasks)

    async def start(self) -> list[Round]:
        """Announce on mDNS and check the DNS name (DiscoveryError if either cannot be done); return the
        periodic rounds to run: seeds, DNS, peer exchange."""
        s = self.settings
        if "mdns" in s.backends:
            await self._start_mdns()
        rounds = []
        if s.seeds:
            rounds.append(Round("seeds", SEED_RETRY_S, SeedDiscovery(s.seeds, prober=self.prober, log=self.log).round))
        if s.dns_name:
            dns = DnsDiscovery(
                s.dns_name, self.port, prober=self.prober, peers=self.peers, log=self.log, interval=s.dns_interval
            )
            try:
                await dns.check()
            except DnsError as e:
                raise DiscoveryError(str(e)) from None
            rounds.append(Round("dns", s.dns_interval, dns.round))
        pex = PeerExchange(
            prober=self.prober,
            peers=self.peers,
            session_factory=self._session_factory,
            rng=random.Random(f"{s.rng_seed}/pex/{self.node_id}"),
            log=self.log,
        )
        rounds.append(Round("pex", s.pex_interval, pex.round))
        return rounds

    async def _start_mdns(self) -> None:
        s = self.settings
        interfaces = mdns_interfaces(s.host, s.mdns_interfaces)
        where = ",".join(interfaces) or "all interfaces"
        try:
            if self._shared_zc is None:
                self._own_zc = make_zeroconf(interfaces)
            self.mdns = MdnsDiscovery(
                self._shared_zc or self._own_zc,
                node_id=self.node_id,
                port=self.port,
                addresses=advertised_addresses(s.host, interfaces),
                identity=self.identity,
                peers=self.peers,
                log=self.log,
                prober=self.prober if self.prober.membership.members_only else None,
            )
            await self.mdns.start()
        except NonUniqueNameException:
            raise DiscoveryError(
                f"node id {self.node_id!r} is already taken on the network: choose another --id"
            ) from None
        except OSError as e:
            raise DiscoveryError(f"mDNS on {where}: {e.strerror or e}") from None

    def learn_inbound(self, url: str) -> None:
        """A peer we did not know exchanged with us: check who it is (once at a time per address; an address
        that could not be reached is not probed again for UNREACHABLE_S)."""
        now = self.clock()
        if self.unreachable.get(url, now) > now:
            return
        self.unreachable.pop(url, None)
        if url in self._probing or len(self._probing) >= MAX_INBOUND_PROBES or self._closed:
            return
        self._probing.add(url)

        async def probe() -> None:
            try:
                if await self.prober.probe(url, "inbound") == "unreachable":
                    self._remember_unreachable(url)
            finally:
                self._probing.discard(url)

        self._spawn(probe())

    def _remember_unreachable(self, url: str) -> None:
        if url not in self.unreachable:
            self.log.info(
                "inbound caller at %s cannot be reached at that address (NAT or firewall?): its exchanges are "
                "answered, and it is not probed again for %.0f s (%s)",
                url,
                UNREACHABLE_S,
                self.prober.last_error or "no reply",
            )
        while len(self.unreachable) >= MAX_UNREACHABLE:
            del self.unreachable[next(iter(self.unreachable))]
        self.unreachable[url] = self.clock() + UNREACHABLE_S

    def recall(self, urls: Iterable[str]) -> None:
        """Probe the peers a checkpoint remembers, once each, so that a restarted node has partners at once
        (mDNS, DNS and seeds find them again too, in their own time)."""
        for url in urls:
            self._spawn(self.prober.probe(url, "checkpoint"))

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Start no more probes (the node is stopping)."""
        self._closed = True

    async def stop(self) -> None:
        """Say goodbye on mDNS and release zeroconf if this node made its own; safe if never started."""
        self._closed = True
        if self.mdns is not None:
            await self.mdns.stop()
        if self._own_zc is not None:
            await self._own_zc.async_close()
