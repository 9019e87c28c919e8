"""Nodes found over mDNS, handed to a collector as they appear (``gossipfl dashboard`` without ``--seeds``).

It listens as ``gossipfl peers`` does (the same service type and records, on the interfaces given, all
when none) but keeps listening, so a node started later appears in the view. A node's goodbye does not
remove it: a node that went away is shown as unreachable."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gossipfl.discovery.mdns import RESOLVE_TIMEOUT_MS, SERVICE_TYPE, describe_service, make_zeroconf
from gossipfl.discovery.service import DiscoveryError
from gossipfl.monitor.collector import Collector, log


class MdnsWatcher:
    """Adds every gossipfl node announced on ``interfaces`` (of ``cluster`` when given) to ``collector``."""

    def __init__(self, collector: Collector, interfaces: Sequence[str] = (), cluster: str | None = None) -> None:
        self.collector = collector
        self.interfaces = tuple(interfaces)
        self.cluster = cluster
        self.seen: dict[str, dict] = {}  # mDNS name -> the node's record as resolved
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Listen; DiscoveryError when mDNS cannot (an interface address this host does not have), as a
        node says it."""
        try:
            self._zc = make_zeroconf(self.interfaces)
        except OSError as e:
            where = ",".join(self.interfaces) or "all interfaces"
            raise DiscoveryError(f"mDNS on {where}: {e.strerror or e}") from None
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    async def stop(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._zc is not None:
            await self._zc.async_close()
            self._zc = None

    def _on_change(self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        found = describe_service(info)
        if found["url"] is None or (self.cluster is not None and found["cluster"] != self.cluster):
            return
        self.seen[name] = found
        try:
            added = self.collector.add(found["url"])
        except ValueError:  # an announcement no node would make
            return
        if added:
            log.info("node found (mDNS): %s at %s", found["id"], found["url"])
