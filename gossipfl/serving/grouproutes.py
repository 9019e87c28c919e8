"""The routes of secure group rounds, thin: read the body (size- and deadline-bound), finish its
authentication, call the node's group, answer. Members only, like ``/v1/gossip`` (serving/auth.py).

- ``POST /v1/group``: an invite; the reply holds this node's public key for the round.
- ``POST /v1/group/{round}/mask``: every member's key; the reply is this node's masked model.
- ``POST /v1/group/{round}/commit``: the sum of the masked vectors; the reply ``{"round", "outcome"}``.
- ``POST /v1/group/{round}/abort``: no body; the reply ``{"round", "outcome": "aborted", "reason"}``.
- ``POST /v1/group/hello``: ``{"sender", "port"}`` of a member that knows too few peers for a round; the
  reply ``{"id"}`` (this node then identifies the caller, as it does a pairwise exchange's initiator).

400 for a message the round cannot take (and the round is aborted here), 401 for a sender that is not the
member it must be, 409 when this node is in another round, stopping, or not in secure group mode."""

from __future__ import annotations

from aiohttp import web

from gossipfl.protocol import wire
from gossipfl.protocol.groupwire import ROUND_RE
from gossipfl.protocol.ledger import ABORTED
from gossipfl.serving.errors import error
from gossipfl.serving.exchanges import REFUSALS, Refused, read_member_body, refusal
from gossipfl.serving.ports import NODE_KEY

PAIRWISE = "this node exchanges pairwise (no --secure-group): it takes part in no group round"


async def _handle(request: web.Request, phase: str) -> web.Response:
    group = request.app[NODE_KEY].group
    if group is None:
        return error(409, PAIRWISE)
    round_id = request.match_info.get("round")
    if round_id is not None and not ROUND_RE.match(round_id):
        return error(400, "round id must be 32 lowercase hex digits")
    try:
        body, member = await read_member_body(request, group.max_body)
        if phase == "invite":
            reply = await group.invite(body, member, remote=request.remote)
            return web.Response(body=reply, content_type=wire.CONTENT_TYPE)
        if phase == "hello":
            group.hello(body, member, request.remote)
            return web.json_response({"id": request.app[NODE_KEY].id})
        assert round_id is not None
        if phase == "mask":
            return web.Response(body=await group.mask(round_id, body, member), content_type=wire.CONTENT_TYPE)
        if phase == "commit":
            outcome, reason = await group.commit(round_id, body, member)
        else:
            outcome, reason = group.abort(round_id, member)
    except Refused as e:
        return e.response
    except REFUSALS as e:
        return refusal(request, e)
    doc = {"round": round_id, "outcome": outcome}
    if outcome == ABORTED:
        doc["reason"] = reason
    return web.json_response(doc)


async def post_invite(request: web.Request) -> web.Response:
    return await _handle(request, "invite")


async def post_hello(request: web.Request) -> web.Response:
    return await _handle(request, "hello")


async def post_phase(request: web.Request) -> web.Response:
    return await _handle(request, request.match_info["phase"])


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/group", post_invite)
    app.router.add_post("/v1/group/hello", post_hello)
    app.router.add_post("/v1/group/{round}/{phase:mask|commit|abort}", post_phase)
