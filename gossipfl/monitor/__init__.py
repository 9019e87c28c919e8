"""Watching many nodes over HTTP: the network view (``gossipfl dashboard``, ``gossipfl testbed --dashboard-port``).

- ``records``: what is kept about one node (its last status, accuracy curve, recent exchanges), read from
  the JSON it serves, whatever that JSON holds;
- ``models``: the consensus distance of the nodes' models, fetched from ``/v1/model``;
- ``collector``: the ``Collector`` that reads every node each interval, a hung one never holding up the rest;
- ``discover``: nodes found over mDNS, added while it runs;
- ``app``: the page and ``GET /api/network``, served on loopback by default;
- ``run``: ``gossipfl dashboard``, until SIGINT or SIGTERM.

It reads nodes as any client does (with the read token when given) and imports serving, protocol,
discovery, security and common, never the node itself.
"""
