"""``--partition auto/N``: a replica's shard from its ordinal, so a scaled deployment needs no per-node
configuration. Kubernetes StatefulSet pods are named ``<set>-<ordinal>`` (their hostname); compose
names replicas ``<project>-<service>-<index>``, which a podman container finds among the names of its
own address (its hostname is the container id). Under Docker, /etc/hosts maps the address to the
container id only, so there ``auto/N`` needs ``hostname:`` set or an explicit ``K/N``."""

from __future__ import annotations

import re
import socket

_ORDINAL = re.compile(r"[-_](\d+)$")


def ordinal_of(name: str) -> int | None:
    """The trailing number of a name's first label: ``web-3.svc.local`` -> 3, ``3f2a9b0c`` -> None."""
    m = _ORDINAL.search(name.split(".", 1)[0])
    return int(m.group(1)) if m else None


def shard_index(names: list[str], num_nodes: int) -> tuple[int, str] | None:
    """K = ordinal mod N from the first name that ends in a number, and that name; None if none does.
    Compose counts from 1 and Kubernetes from 0; either way N consecutive replicas get N distinct shards."""
    for name in names:
        n = ordinal_of(name)
        if n is not None:
            return n % num_nodes, name
    return None


def own_names() -> list[str]:
    """This host's name, then the names reverse DNS gives for its addresses (blocking: call in a thread)."""
    host = socket.gethostname()
    names = [host]
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None, family=socket.AF_INET)}
    except OSError:
        addrs = set()
    for addr in sorted(addrs):
        if addr.startswith("127."):
            continue
        try:
            name, aliases, _ = socket.gethostbyaddr(addr)
        except OSError:
            continue
        names += [name, *aliases]  # podman lists the container's name as an alias of its address
    return names
