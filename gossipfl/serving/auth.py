"""Who may call which route (see SECURITY.md).

- ``/v1/gossip`` and its decisions: members only, when the node has a cluster key or mutual TLS: a signed
  request (``security.signing``), a client certificate from the cluster CA, or both; and, with
  ``--allow-ids``, an id on the list. The gossip body is part of the signature, so ``post_gossip`` finishes
  the check once it has read the body (``authenticate``); the rest is checked here, before any body is read.
- ``/v2/health/live`` and ``/v2/health/ready``: open, for orchestrators.
- Everything else (model, status, peers, metrics, OpenAPI, inference): the read token when one is set
  (``Authorization: Bearer``), or a member's signed request or certificate (node-to-node reads).

Replies to signed requests are signed. A refusal is 401 with ``WWW-Authenticate`` and the one error shape;
it never echoes a header, and only the first refusal per address and reason is logged above debug."""

from __future__ import annotations

import logging
from collections import Counter

from aiohttp import web

from gossipfl.security.membership import Membership, Pending
from gossipfl.security.signing import HEADER, Unauthorized, parse
from gossipfl.security.tls import node_id_of
from gossipfl.serving.errors import closing, error

log = logging.getLogger("gossipfl.auth")

MEMBERSHIP_KEY: web.AppKey[Membership] = web.AppKey("membership", Membership)
REFUSED_KEY: web.AppKey[Counter] = web.AppKey("refused", Counter)  # 401s by kind: member, read
LOGGED_KEY: web.AppKey[set] = web.AppKey("refusals_logged", set)
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
GOSSIP = "/v1/gossip"
# per request: the node id of the client's certificate, and the request as the reply's signature needs it
_STATE = web.RequestKey("gossipfl.auth", dict) if hasattr(web, "RequestKey") else "gossipfl.auth"
_LOGGED_LIMIT = 1024


def is_member_route(path: str) -> bool:
    return path == GOSSIP or path.startswith(GOSSIP + "/")


def refuse(request: web.Request, kind: str, reason: str) -> web.Response:
    """401 for ``kind`` ("member" or "read"), counted, logged once per address and reason."""
    request.app[REFUSED_KEY][kind] += 1
    logged = request.app[LOGGED_KEY]
    key = (request.remote, kind, reason.split(":")[0])
    level = logging.DEBUG if key in logged else logging.WARNING
    if len(logged) < _LOGGED_LIMIT:
        logged.add(key)
    log.log(level, "refused %s %s from %s: %s", request.method, request.path, request.remote, reason)
    m = request.app[MEMBERSHIP_KEY]
    challenge = 'Bearer realm="gossipfl"' if kind == "read" else "Gossipfl-Signature" if m.key else "Mutual-TLS"
    resp = error(401, f"unauthorized: {reason}")
    resp.headers["WWW-Authenticate"] = challenge
    return closing(resp)


def cert_id(request: web.Request) -> str | None:
    """The node id in the client's verified certificate, if it presented one."""
    transport = request.transport
    return node_id_of(transport.get_extra_info("peercert")) if transport is not None else None


def authenticate(request: web.Request, body: bytes) -> str | None:
    """Finish checking a members-only request whose body is ``body``: the member's id (None on an open node).
    Raises Unauthorized."""
    m = request.app[MEMBERSHIP_KEY]
    state = request[_STATE]
    who, nonce = m.check_request(request.method, request.raw_path, request.headers, body, state["cert"])
    state["pending"] = Pending(request.method, request.raw_path, nonce)
    return who


def install(app: web.Application, membership: Membership) -> None:
    """Put ``members_only`` in front of every route of ``app``, enforcing ``membership``."""
    app[MEMBERSHIP_KEY] = membership
    app[REFUSED_KEY] = Counter()
    app[LOGGED_KEY] = set()
    app.middlewares.insert(0, members_only)


@web.middleware
async def members_only(request: web.Request, handler: object) -> web.StreamResponse:
    m = request.app[MEMBERSHIP_KEY]
    state = request[_STATE] = {"cert": cert_id(request) if m.tls is not None else None, "pending": None}
    try:
        if is_member_route(request.path):
            if m.members_only:
                if request.path == GOSSIP:  # the body is read, and the check finished, by post_gossip
                    if m.tls is not None and state["cert"] is None:
                        raise Unauthorized("a client certificate from the cluster CA is required")
                    if m.key is not None:
                        parse(request.headers.get(HEADER))
                else:
                    authenticate(request, b"")
        elif request.path not in OPEN_PATHS:
            member = (m.key is not None and HEADER in request.headers) or state["cert"] is not None
            if member:
                authenticate(request, b"")
            elif not m.bearer_ok(request.headers.get("Authorization")):
                return refuse(request, "read", "a read token is required (Authorization: Bearer TOKEN)")
    except Unauthorized as e:
        return refuse(request, "member", str(e))
    resp = await handler(request)  # type: ignore[operator]
    pending = state["pending"]
    if pending is not None and resp.status != 401 and isinstance(resp, web.Response) and isinstance(resp.body, bytes):
        resp.headers.update(m.reply_headers(pending, resp.status, resp.body))
    return resp
