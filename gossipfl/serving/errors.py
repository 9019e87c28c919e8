"""The one error shape of every route, ``{"error": "..."}``, and the middleware that keeps it so."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web

from gossipfl.common.chunks import Chunks, ChunksPayload
from gossipfl.common.httpio import BodyError

log = logging.getLogger("gossipfl.api")


def error(status: int, message: str) -> web.Response:
    """The one error shape of every route: ``{"error": "..."}``."""
    return web.json_response({"error": message}, status=status)


def finite(doc: Any) -> Any:
    """``doc`` with every float that is NaN or infinite replaced by None: JSON has no such numbers, and a
    browser's JSON.parse refuses the ``NaN`` Python writes (a model that diverged has a NaN loss)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite(v) for v in doc]
    return doc


def dumps_finite(doc: Any) -> str:
    """``doc`` as JSON, a number that is not finite as null (``finite``; that pass only when one is there)."""
    try:
        return json.dumps(doc, allow_nan=False)
    except ValueError:
        return json.dumps(finite(doc), allow_nan=False)


def json_finite(doc: Any) -> web.Response:
    """A JSON answer of ``doc`` with non-finite numbers as null (``dumps_finite``)."""
    return web.json_response(doc, dumps=dumps_finite)


def streamed(body: Chunks, content_type: str, headers: dict[str, str] | None = None) -> web.Response:
    """A 200 whose body goes out piece by piece (its length declared), never joined."""
    return web.Response(body=ChunksPayload(body, content_type=content_type), headers=headers)


def closing(resp: web.Response) -> web.Response:
    """Close the connection after this answer instead of reading (draining) an unread body."""
    resp.force_close()
    return resp


@web.middleware
async def json_errors(request: web.Request, handler: object) -> web.StreamResponse:
    """Every HTTP error leaves as JSON; unexpected exceptions become a logged 500 (never for bad input)."""
    try:
        return await handler(request)  # type: ignore[operator]
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error(e.status, e.reason if e.text is None or e.text.startswith(str(e.status)) else e.text)
    except BodyError as e:  # the client hung up or stalled mid-body: its problem, not worth a traceback
        log.debug("%s %s from %s: %s", request.method, request.path, request.remote, e)
        return closing(error(400, str(e)))
    except ConnectionError as e:  # the client is gone: nobody to answer, nothing to report above debug
        log.debug("%s %s from %s: connection lost: %s", request.method, request.path, request.remote, e)
        return closing(error(400, "connection lost"))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error(500, "internal error")
