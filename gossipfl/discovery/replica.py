"""``--partition auto/N``: a replica's shard from its ordinal, so a scaled deployment needs no per-node
configuration. Kubernetes StatefulSet pods are named ``<set>-<ordinal>`` (their hostname); compose
names replicas ``<project>-<service>-<index>``, which a podman container finds among the names /etc/hosts
gives its own address (its hostname is the container id). Under the Docker engine /etc/hosts maps the
address to the container id only; there the name comes from a PTR query to the DNS server of
/etc/resolv.conf (Docker's embedded DNS answers ``<name>.<network>``), see discovery/reverse.py."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

from .reverse import ptr_names

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


def own_names(ptr: Callable[[str], list[str]] = ptr_names) -> list[str]:
    """This host's name, then the names the system resolver gives its addresses (/etc/hosts first), then,
    only when none of those carries an ordinal, the names a PTR query to the DNS server gives them
    (blocking: call in a thread)."""
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
    if not any(ordinal_of(name) is not None for name in names):
        for addr in sorted(addrs):
            if not addr.startswith("127."):  # Docker: <project>-<service>-<index>.<network> from its embedded DNS
                names += [name for name in ptr(addr) if not embeds_address(name, addr)]
    return names


def embeds_address(name: str, addr: str) -> bool:
    """Whether a name's first label spells the address (``10-244-1-5.ns.pod.cluster.local``,
    ``ip-10-0-0-23.internal``): its trailing number is an octet, not a replica's ordinal."""
    label, octets = name.split(".", 1)[0], addr.split(".")
    return any(sep.join(order) in label for sep in "-_." for order in (octets, octets[::-1]))
