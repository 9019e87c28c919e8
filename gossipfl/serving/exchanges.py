"""What the members-only exchange routes share (``POST /v1/gossip``, ``/v1/group...``): reading a body
whose size and deadline are bounded, finishing its authentication, and turning the protocol's refusals
into answers."""

from __future__ import annotations

from aiohttp import web

from gossipfl.common.httpio import BodyError, BodyTimeout, TooLarge, read_limited
from gossipfl.protocol import wire
from gossipfl.protocol.responder import Busy, Conflict, Impersonation
from gossipfl.protocol.transport import timeout_for
from gossipfl.security.http import hashing
from gossipfl.security.signing import Unauthorized
from gossipfl.serving import auth
from gossipfl.serving.errors import closing, error

REFUSALS = (Impersonation, Busy, Conflict, wire.WireError)


class Refused(Exception):
    """The request cannot go on; ``response`` is the answer to give."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


async def read_member_body(request: web.Request, limit: int) -> tuple[bytearray, str | None]:
    """The body, read whole within a deadline that grows with its size (413 over ``limit``, 408 when it
    stops coming, 400 when it is cut short), and the member it authenticates (401): ``Refused`` otherwise."""
    declared = request.content_length
    try:
        body = await read_limited(request.content, declared, limit, timeout_for(min(declared or limit, limit)))
    except TooLarge as e:
        raise Refused(closing(error(413, str(e)))) from None
    except BodyError as e:
        raise Refused(closing(error(408 if isinstance(e, BodyTimeout) else 400, str(e)))) from None
    try:
        return body, await hashing(len(body), auth.authenticate, request, body)
    except Unauthorized as e:
        raise Refused(auth.refuse(request, "member", str(e))) from None


def refusal(request: web.Request, e: Exception) -> web.Response:
    """The answer to one of ``REFUSALS``: 401 for a sender that is not the member it must be, 409 for a
    node that cannot take the exchange now, 400 for a message it cannot take."""
    if isinstance(e, Impersonation):
        return auth.refuse(request, "member", str(e))
    if isinstance(e, (Busy, Conflict)):
        return error(409, str(e))
    return error(400, str(e))
