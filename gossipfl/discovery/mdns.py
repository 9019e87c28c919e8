"""mDNS discovery (zeroconf): announce this node, browse for peers, feed the PeerTable; ``browse`` for
``gossipfl peers``. Static seeds: ``seeds.py``; DNS: ``dns.py``."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence

from zeroconf import IPVersion, ServiceStateChange, get_all_addresses
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gossipfl.discovery.identity import Identity
from gossipfl.discovery.peers import PeerTable
from gossipfl.discovery.probing import Prober

SERVICE_TYPE = "_gossipfl._tcp.local."
TXT_VERSION = "1"
MAX_PROBES = 16  # members only: announced addresses being probed at once
RESOLVE_TIMEOUT_MS = 3000
MAX_OTHER_CLUSTERS = 64


def make_zeroconf(interfaces: Sequence[str] = ()) -> AsyncZeroconf:
    """An IPv4 AsyncZeroconf on the given interface addresses, or on all of them when empty."""
    from zeroconf import InterfaceChoice

    chosen = list(interfaces) if interfaces else InterfaceChoice.All
    return AsyncZeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)


def mdns_interfaces(host: str, configured: Sequence[str]) -> tuple[str, ...]:
    """The interfaces mDNS uses: those configured, else the one whose address the node binds (a node on
    127.0.0.1 announces on loopback only, not 127.0.0.1 on every interface), else all (empty)."""
    if configured:
        return tuple(configured)
    return () if host in ("0.0.0.0", "") else (host,)


def advertised_addresses(host: str, interfaces: Sequence[str]) -> list[str]:
    """Addresses to put in our mDNS record. Loopback only when we are confined to it, so that a peer on
    another host never dials 127.0.0.1 and reaches itself."""
    if interfaces:
        return list(interfaces)
    if host not in ("0.0.0.0", ""):
        return [host]
    addrs = [a for a in get_all_addresses() if not ipaddress.IPv4Address(a).is_loopback]
    return addrs or ["127.0.0.1"]


def service_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


def describe_service(info: AsyncServiceInfo) -> dict[str, str | None]:
    """id, url, task and proto of a resolved gossipfl service (url None without an IPv4 address)."""
    props = info.properties or {}
    addrs = info.parsed_addresses(IPVersion.V4Only)
    return {
        "id": _txt(props, "id") or info.name.removesuffix("." + SERVICE_TYPE),
        "url": f"{_scheme(props)}://{addrs[0]}:{info.port}" if addrs and info.port else None,
        "task": _txt(props, "task"),
        "proto": _txt(props, "proto"),
        "model": _txt(props, "model"),
        "cluster": _txt(props, "cluster") or "default",
        "merge": _txt(props, "merge"),
        "split": _txt(props, "split"),
        "init": _txt(props, "init"),
        "exchange": _txt(props, "exchange"),
        "scheme": _scheme(props),
    }


def _scheme(properties: dict[bytes, bytes | None]) -> str:
    """The scheme a node serves, from its TXT record (http unless it says https)."""
    return "https" if _txt(properties, "scheme") == "https" else "http"


def _txt(properties: dict[bytes, bytes | None], key: str) -> str | None:
    value = properties.get(key.encode())
    return value.decode("utf-8", "replace") if value is not None else None


class MdnsDiscovery:
    """Registers this node (instance name = node id) and browses for the others."""

    def __init__(
        self,
        zc: AsyncZeroconf,
        *,
        node_id: str,
        port: int,
        addresses: Iterable[str],
        identity: Identity,
        peers: PeerTable,
        log: logging.LoggerAdapter,
        prober: Prober | None = None,
    ) -> None:
        self.zc = zc
        self.identity = identity
        self.node_id = node_id
        self.peers = peers
        self.log = log
        self.prober = prober  # members only: peers announced over mDNS are probed before they are added
        self._probing: set[str] = set()  # addresses being probed
        self.info = AsyncServiceInfo(
            SERVICE_TYPE,
            service_name(node_id),
            addresses=[socket.inet_aton(a) for a in addresses],
            port=port,
            properties={"txtvers": TXT_VERSION, "id": node_id, **identity.txt()},
            server=f"{node_id}.local.",
        )
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()
        self.other_clusters: dict[str, set[str]] = {}  # ids of other clusters' nodes seen, per cluster
        self._registered = False

    async def start(self) -> None:
        # async_register_service schedules the probe/announce and returns a task: wait for it too
        await (await self.zc.async_register_service(self.info))
        self._registered = True
        self._browser = AsyncServiceBrowser(self.zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    async def stop(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._registered:
            self._registered = False
            await (await self.zc.async_unregister_service(self.info))  # goodbye packets, sent when this returns

    def _on_change(self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == self.info.name:
            return
        if state_change is ServiceStateChange.Removed:
            peer_id = name.removesuffix("." + SERVICE_TYPE)
            known = self.peers.get(peer_id)
            if self.prober is not None and known is not None and known.alive and known.last_ok is not None:
                return  # members only: anyone can send a goodbye; a peer that answers stays until it does not
            if self.peers.remove(peer_id):
                self.log.info("peer removed (mDNS goodbye): %s", peer_id)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self.zc.zeroconf, RESOLVE_TIMEOUT_MS):
            self.log.debug("could not resolve %s", name)
            return
        found = describe_service(info)
        peer_id, url, task = found["id"], found["url"], found["task"]
        if peer_id == self.node_id or url is None:
            return
        if found["cluster"] != self.identity.cluster:  # another cluster's nodes are not ours to list
            names = self.other_clusters.get(found["cluster"])
            if names is None and len(self.other_clusters) < MAX_OTHER_CLUSTERS:
                names = self.other_clusters[found["cluster"]] = set()
            if names is not None and len(names) < 256:
                names.add(peer_id)
            return
        reason = self.identity.mismatch_of(found)
        known = self.peers.get(peer_id)
        if reason:
            if known is not None:  # a record claiming a known peer's id cannot remove it (anyone can announce)
                self.log.debug("mDNS: %s announced as %s but %s; the known peer stays", url, peer_id, reason)
            elif self.peers.ignore(peer_id, url, reason):
                self.log.warning("ignoring %s at %s: %s", peer_id, url, reason)
            return
        if self.prober is not None and (known is None or known.url != url):
            # members only: an mDNS record proves nothing, so the node at that address must prove it is a
            # member (a signed status, a certificate for the id it states) before it enters the peer table;
            # at most MAX_PROBES at once, so that a flood of announcements makes this node dial little
            if len(self._probing) >= MAX_PROBES or url in self._probing:
                return
            self._probing.add(url)
            try:
                await self.prober.probe(url, "mdns", claimed=peer_id)
            finally:
                self._probing.discard(url)
            return
        if self.peers.upsert(peer_id, url, task, "mdns"):
            self.log.info("peer found (mDNS): %s at %s", peer_id, url)
            if caveat := self.identity.caveat(found["init"]):
                self.log.warning("peer %s: %s", peer_id, caveat)
        else:
            self.peers.refresh(peer_id)  # announced again (restarted, or back): no need to wait out a backoff


async def browse(interfaces: Sequence[str], timeout: float) -> list[dict]:
    """Listen for ``timeout`` seconds and return the gossipfl services seen (for ``gossipfl peers``)."""
    azc = make_zeroconf(interfaces)
    names: set[str] = set()

    def on_change(zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.sleep(timeout)
        infos = [AsyncServiceInfo(SERVICE_TYPE, n) for n in sorted(names)]
        await asyncio.gather(*(i.async_request(azc.zeroconf, RESOLVE_TIMEOUT_MS) for i in infos))
    finally:
        await browser.async_cancel()
        await azc.async_close()
    found = [describe_service(info) for info in infos]
    return found
