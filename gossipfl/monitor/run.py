"""``gossipfl dashboard``: the network view of the nodes given (``--seeds``) or found over mDNS, served until
SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence

from gossipfl.monitor.app import DashboardServer
from gossipfl.monitor.collector import Collector
from gossipfl.monitor.discover import MdnsWatcher


async def serve_dashboard(
    collector: Collector,
    *,
    host: str,
    port: int,
    mdns: bool,
    mdns_interfaces: Sequence[str] = (),
    cluster: str | None = None,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> None:
    """Serve the view of ``collector``'s nodes (and, with ``mdns``, of every node announced) until a signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = DashboardServer(collector, host, port)
    watcher = MdnsWatcher(collector, mdns_interfaces, cluster) if mdns else None
    try:
        url = await server.start()  # (OSError when the port is taken)
        if watcher is not None:
            await watcher.start()
        where = f"{len(collector.nodes)} node(s)" if not mdns else "the nodes announced over mDNS"
        say(f"dashboard: {url} (watching {where}; Ctrl-C stops)")
        await stop.wait()
    finally:
        if watcher is not None:
            await watcher.stop()
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
