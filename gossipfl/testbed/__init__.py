"""Local testbed: N nodes on 127.0.0.1 with mDNS confined to loopback, watched over HTTP.

Two ways to run the nodes, behind one small interface (``Launcher``, in ``launchers``):

- ``process`` (default): one ``gossipfl node`` process per node, stopped with SIGTERM;
- ``inproc``: all nodes in this process, on one event loop with one shared loopback AsyncZeroconf,
  one HTTP server each, torch on one thread and a small worker pool for the nodes' blocking work
  (cheap enough for 64 nodes on a 2-core machine).

Both are measured the same way (``observe``): every sample interval the testbed reads each node's
/v1/status and /v1/model over HTTP, records accuracy and the consensus distance (how far the models are
from their mean), and draws a live table (``rich`` on a terminal). At the end it stops the nodes and writes
``results.json`` (``report``) and ``convergence.png`` (``plot``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gossipfl.common.lazy import lazy_getattr

__all__ = ["TestbedOptions", "relative", "run_testbed"]

_EXPORTS = {
    "TestbedOptions": "gossipfl.testbed.options",
    "relative": "gossipfl.testbed.report",
    "run_testbed": "gossipfl.testbed.run",
}

if TYPE_CHECKING:
    from gossipfl.testbed.options import TestbedOptions
    from gossipfl.testbed.report import relative
    from gossipfl.testbed.run import run_testbed


# loaded on first use: the zygote (python -m gossipfl.testbed.zygote) imports this package and must not
# import torch through it before it has set its signal handling
__getattr__ = lazy_getattr(__name__, _EXPORTS)
