"""HTTP routes, thin: parse, call the node, respond. One error shape: ``{"error": "..."}``."""

from __future__ import annotations

from aiohttp import web

from gossipfl.protocol import wire
from gossipfl.protocol.ledger import ABORTED
from gossipfl.protocol.responder import Impersonation, Unavailable
from gossipfl.protocol.transport import RETRY_HEADER
from gossipfl.security.membership import Membership
from gossipfl.serving import auth, dashboard, grouproutes, inference, modelfile, openapi
from gossipfl.serving.errors import closing, error, json_errors, json_finite, streamed
from gossipfl.serving.exchanges import REFUSALS, Refused, read_member_body, refusal
from gossipfl.serving.ports import NODE_KEY, NodeView


async def get_status(request: web.Request) -> web.Response:
    return json_finite(request.app[NODE_KEY].status())


async def get_history(request: web.Request) -> web.Response:
    """The evaluations and recent exchanges after ``evals_after`` and ``exchanges_after`` (sequence numbers
    from an earlier answer; 0 or absent: all that is kept)."""
    try:
        after = [int(request.query.get(k, "0")) for k in ("evals_after", "exchanges_after")]
    except ValueError:
        return error(400, "evals_after and exchanges_after must be integers")
    return json_finite(request.app[NODE_KEY].history(*after))


async def get_peers(request: web.Request) -> web.Response:
    """The peers this node knows and that are not failing (peer exchange reads this, so a hung or dead
    peer is not spread): id, url, task, source, liveness, last contact."""
    peers = request.app[NODE_KEY].peers
    return web.json_response({"id": request.app[NODE_KEY].id, "peers": peers.describe(peers.working())})


async def get_model(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]  # (a member's read on a node with --secure-group: 403, serving/auth.py)
    fmt = request.query.get("format", "msgpack")
    if fmt == "msgpack":  # the gossip payload of the working model
        try:
            body = await node.model_payload()
        except wire.WireError as e:  # the model itself is not sendable (not finite): the node's problem
            return error(503, f"the working model cannot be sent: {e}")
        return streamed(body, wire.CONTENT_TYPE)
    if fmt == "safetensors":  # the served model, for torch
        body = await node.model_file()
        name = f"{node.task.name}-{node.id}.safetensors"
        return streamed(body, modelfile.CONTENT_TYPE, {"Content-Disposition": f'attachment; filename="{name}"'})
    return error(400, f"format {fmt!r}: expected msgpack or safetensors")


async def get_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[NODE_KEY].metrics.exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(request.app[NODE_KEY].task.name))


async def post_gossip(request: web.Request) -> web.Response:
    """Phase 1 of an exchange. Whether there is room is checked before the body is read, and the body
    must arrive within a deadline that grows with its size."""
    gossiper = request.app[NODE_KEY].gossiper
    retry_of = request.headers.get(RETRY_HEADER)  # a retried prepare: the xid it repeats
    if retry_of is not None and not wire.XID_RE.match(retry_of):
        return closing(error(400, f"{RETRY_HEADER} must be an exchange id of 32 lowercase hex digits"))
    if not gossiper.reserve(retry_of):
        return closing(error(409, gossiper.refusal()))
    try:
        body, member = await read_member_body(request, gossiper.max_body)
        reply = await gossiper.prepare(body, remote=request.remote, member=member, retry_of=retry_of)
    except Refused as e:
        return e.response
    except REFUSALS as e:
        return refusal(request, e)
    except Unavailable as e:
        return error(503, str(e))
    finally:
        gossiper.release()
    return streamed(reply, wire.CONTENT_TYPE)


async def post_decision(request: web.Request) -> web.Response:
    """Phase 2: ``POST /v1/gossip/{xid}/commit`` or ``.../abort``; the answer is the outcome, the same to
    every call about one xid."""
    xid, decision = request.match_info["xid"], request.match_info["decision"]
    if not wire.XID_RE.match(xid):
        return error(400, "exchange id must be 32 lowercase hex digits")
    try:
        outcome, reason = await request.app[NODE_KEY].gossiper.decide(xid, decision, member=auth.member(request))
    except Impersonation as e:
        return auth.refuse(request, "member", str(e))
    doc = {"xid": xid, "outcome": outcome}
    if outcome == ABORTED:
        doc["reason"] = reason
    return web.json_response(doc)


def build_app(node: NodeView, membership: Membership | None = None) -> web.Application:
    """The node's routes, behind ``membership`` (open when None, see serving/auth.py)."""
    app = web.Application(middlewares=[json_errors], client_max_size=node.gossiper.max_body)
    auth.install(app, membership or Membership(node.id))
    app[NODE_KEY] = node
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/history", get_history)
    app.router.add_get("/v1/model", get_model)
    app.router.add_get("/v1/peers", get_peers)
    app.router.add_post("/v1/gossip", post_gossip)
    app.router.add_post("/v1/gossip/{xid}/{decision:commit|abort}", post_decision)
    grouproutes.add_routes(app)
    app.router.add_get("/v1/openapi.json", get_openapi)
    app.router.add_get("/metrics", get_metrics)
    inference.add_routes(app)
    dashboard.add_routes(app)
    return app
