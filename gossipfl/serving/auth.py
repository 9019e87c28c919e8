"""Who may call which route (see SECURITY.md).

- ``/v1/gossip`` and its decisions, and ``/v1/group`` (secure group rounds): members only, when the node has
  a cluster key or mutual TLS: a signed request (``security.signing``), a client certificate from the cluster
  CA, or both; and, with ``--allow-ids``, an id on the list. All of it but the body's signature is checked
  here, before a body is read or room reserved for it (a non-member holds no exchange slot); ``post_gossip``
  and the group routes finish the check once they have read the body (``authenticate``).
- ``/v2/health/live`` and ``/v2/health/ready``: open, for orchestrators; ``/`` and ``/static/...``: open, the
  dashboard page and its assets (they hold no data: the page asks for the read token, serving/dashboard.py).
- Everything else (model, status, peers, metrics, OpenAPI, inference): the read token when one is set
  (``Authorization: Bearer``), or a member's signed request or certificate (node-to-node reads). On a node
  with ``--secure-group``, a member is refused (403) what shows the model: ``/v1/model`` and inference.

Replies to signed requests are signed. A refusal is 401 with ``WWW-Authenticate`` and the one error shape;
it never echoes a header, and only the first refusal per address and reason is logged above debug."""

from __future__ import annotations

import logging
from collections import Counter

from aiohttp import web

from gossipfl.common.chunks import Chunks, ChunksPayload
from gossipfl.security.http import hashing
from gossipfl.security.membership import Membership
from gossipfl.security.signing import HEADER, Overloaded, Unauthorized
from gossipfl.security.tls import node_id_of
from gossipfl.serving import dashboard
from gossipfl.serving.errors import closing, error
from gossipfl.serving.ports import NODE_KEY

log = logging.getLogger("gossipfl.auth")

MEMBERSHIP_KEY: web.AppKey[Membership] = web.AppKey("membership", Membership)
REFUSED_KEY: web.AppKey[Counter] = web.AppKey("refused", Counter)  # 401s by kind: member, read
LOGGED_KEY: web.AppKey[set] = web.AppKey("refusals_logged", set)
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
GOSSIP = "/v1/gossip"
GROUP = "/v1/group"  # secure group rounds: every request has a body (maybe empty), checked by the route
SECURE_GROUP = "secure group: members never read or query each other's models (an operator uses its read token)"
# per request: the node id of the client's certificate, and the request as the reply's signature needs it
_STATE = web.RequestKey("gossipfl.auth", dict) if hasattr(web, "RequestKey") else "gossipfl.auth"
_LOGGED_LIMIT = 1024


def is_member_route(path: str) -> bool:
    return path == GOSSIP or path.startswith(GOSSIP + "/") or _is_group(path)


def _is_group(path: str) -> bool:
    return path == GROUP or path.startswith(GROUP + "/")


def shows_model(path: str) -> bool:
    """Whether a read route gives away the model, or answers queries about it (what secure groups keep from
    members)."""
    return path == "/v1/model" or (path.startswith("/v2/models/") and path.endswith("/infer"))


def refuse(request: web.Request, kind: str, reason: str) -> web.Response:
    """401 for ``kind`` ("member" or "read"), counted; logged at warning level the first time per address and
    reason (up to _LOGGED_LIMIT of them, then at debug), with the path as sent (percent-encoded: one line)."""
    request.app[REFUSED_KEY][kind] += 1
    logged = request.app[LOGGED_KEY]
    key = (request.remote, kind, reason.split(":")[0])
    level = logging.DEBUG
    if key not in logged and len(logged) < _LOGGED_LIMIT:
        logged.add(key)
        level = logging.WARNING
    log.log(level, "refused %s %s from %s: %s", request.method, request.raw_path[:200], request.remote, reason)
    m = request.app[MEMBERSHIP_KEY]
    challenge = 'Bearer realm="gossipfl"' if kind == "read" else "Gossipfl-Signature" if m.key else "Mutual-TLS"
    resp = error(401, f"unauthorized: {reason}")
    resp.headers["WWW-Authenticate"] = challenge
    return closing(resp)


def cert_id(request: web.Request) -> str | None:
    """The node id in the client's verified certificate, if it presented one."""
    transport = request.transport
    return node_id_of(transport.get_extra_info("peercert")) if transport is not None else None


def _admit(request: web.Request, length: int) -> None:
    """Check a members-only request's head (Unauthorized), keeping what its body check will need."""
    m, state = request.app[MEMBERSHIP_KEY], request[_STATE]
    state["admitted"] = m.check_head(request.method, request.raw_path, request.headers, length, state["cert"])


def authenticate(request: web.Request, body: bytes) -> str | None:
    """Finish checking a members-only request admitted by the middleware, now that its body is read: the
    member's id (None on an open node). Raises Unauthorized."""
    m, state = request.app[MEMBERSHIP_KEY], request[_STATE]
    admitted = state["admitted"]
    if admitted is None:  # a route that reads a body without the middleware having admitted it: a bug
        raise Unauthorized("request not admitted")
    state["pending"] = m.check_body(admitted, request.method, request.raw_path, body)
    return admitted.member


def member(request: web.Request) -> str | None:
    """The node id the request authenticated as (None on an open node, or for a read with a token)."""
    admitted = request[_STATE]["admitted"]
    return admitted.member if admitted is not None else None


def install(app: web.Application, membership: Membership) -> None:
    """Put ``members_only`` in front of every route of ``app``, enforcing ``membership``."""
    app[MEMBERSHIP_KEY] = membership
    app[REFUSED_KEY] = Counter()
    app[LOGGED_KEY] = set()
    app.middlewares.insert(0, members_only)


@web.middleware
async def members_only(request: web.Request, handler: object) -> web.StreamResponse:
    m = request.app[MEMBERSHIP_KEY]
    state = request[_STATE] = {"cert": cert_id(request) if m.tls is not None else None, "admitted": None,
                               "pending": None}  # fmt: skip
    forbidden = False
    try:
        if is_member_route(request.path):
            if request.path == GOSSIP or _is_group(request.path):  # on its head; the route checks the body
                _admit(request, request.content_length or 0)
            else:  # a decision: no body
                _admit(request, 0)
                authenticate(request, b"")
        elif request.path not in OPEN_PATHS and not dashboard.is_page(request.path):
            if (m.key is not None and HEADER in request.headers) or state["cert"] is not None:
                _admit(request, 0)  # a member's read (status probe, peer exchange)
                authenticate(request, b"")
                forbidden = request.app[NODE_KEY].group is not None and shows_model(request.path)
            elif not m.bearer_ok(request.headers.get("Authorization")):
                return refuse(request, "read", "a read token is required (Authorization: Bearer TOKEN)")
    except Unauthorized as e:
        return refuse(request, "member", str(e))
    except Overloaded as e:
        resp = error(503, str(e))
        resp.headers["Retry-After"] = "1"
        return closing(resp)
    resp = error(403, SECURE_GROUP) if forbidden else await handler(request)  # type: ignore[operator]
    pending = state["pending"]
    if pending is not None and resp.status != 401 and isinstance(resp, web.Response):
        body = resp.body.chunks if isinstance(resp.body, ChunksPayload) else resp.body
        if isinstance(body, (bytes, Chunks)):
            resp.headers.update(await hashing(len(body), m.reply_headers, pending, resp.status, body))
    return resp
