"""Open Inference Protocol v2 routes (KServe / Triton REST), thin: the codec is in ``oip``.

The model's name is the task's name; its only version is "1" (the served model changes as the node
learns; ``GET /v1/status`` says how old it is).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from aiohttp import web

from gossipfl.common.httpio import BodyTimeout, TooLarge, read_limited
from gossipfl.protocol.transport import timeout_for
from gossipfl.serving import oip
from gossipfl.serving.errors import closing, error
from gossipfl.serving.ports import NODE_KEY, NodeView
from gossipfl.version import __version__

T = TypeVar("T")
MAX_BATCH = 4096
JSON_CHARS_PER_VALUE = 32  # generous: "-1.2345678901234567e-05, " is 25


def max_infer_body(node: NodeView) -> int:
    """Largest infer request accepted: MAX_BATCH rows as JSON text, plus room for the header."""
    values = sum(math.prod(d for d in t.shape if d != -1) for t in node.signature.inputs)
    return 64 * 1024 + MAX_BATCH * values * JSON_CHARS_PER_VALUE


def _model(request: web.Request) -> tuple[NodeView, web.Response | None]:
    node = request.app[NODE_KEY]
    name = request.match_info["name"]
    version = request.match_info.get("version")
    if name != node.task.name:
        return node, error(404, f"unknown model {name!r}; this node serves {node.task.name!r}")
    if version is not None and version != "1":
        return node, error(404, f"model {name!r} has no version {version!r}; its only version is '1'")
    return node, None


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    if not request.app[NODE_KEY].ready:
        return error(400, "not ready: the model has not been trained or merged yet")
    return web.json_response({"ready": True})


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(oip.server_metadata(__version__))


async def model_metadata(request: web.Request) -> web.Response:
    node, problem = _model(request)
    if problem:
        return problem
    sig = node.signature
    return web.json_response(oip.model_metadata(node.task.name, sig.inputs, sig.outputs))


async def model_ready(request: web.Request) -> web.Response:
    node, problem = _model(request)
    if problem:
        return problem
    if not node.ready:
        return error(400, f"model {node.task.name!r} is not ready: not trained or merged yet")
    return web.json_response({"name": node.task.name, "ready": True})


async def infer(request: web.Request) -> web.Response:
    node, problem = _model(request)
    if problem:
        return problem
    start = time.perf_counter()
    response = await _infer(request, node)
    metrics = node.metrics
    metrics.inference_requests.labels(node.task.name, str(response.status)).inc()
    if response.status == 200:
        metrics.inference_duration.labels(node.task.name).observe(time.perf_counter() - start)
    return response


async def _infer(request: web.Request, node: NodeView) -> web.Response:
    limit = max_infer_body(node)
    if node.inference_uploads.locked():  # enough bodies on their way already: do not take this one in
        resp = error(503, "too many inference requests being received at once; retry")
        resp.headers["Retry-After"] = "1"
        resp.force_close()
        return resp
    try:
        async with node.inference_uploads:
            body = await read_limited(request.content, request.content_length, limit, timeout_for(limit))
    except TooLarge as e:
        return error(413, str(e))
    except BodyTimeout as e:  # (a body cut short is the client gone: json_errors answers 400 for that)
        return closing(error(408, str(e)))
    sig = node.signature
    header = request.headers.get(oip.HEADER)
    async with node.inference_slots:  # a burst of queries must not take every worker thread from training
        try:
            req = await _maybe_in_thread(
                len(body), oip.parse_request, body, header, sig.inputs, sig.outputs, max_batch=MAX_BATCH
            )
        except oip.InferError as e:
            return error(e.status, str(e))
        results = await node.infer(req.inputs)
        bad = [name for name, arr in results.items() if arr.dtype.kind == "f" and not np.isfinite(arr).all()]
        if bad:
            # the input's fault only if the model answers a plain input (zeros) with finite values
            if not await node.model_is_finite():
                return error(503, f"model {node.task.name!r} is broken: its outputs are not finite for any input")
            return error(400, f"the model's {', '.join(bad)} are not finite for this input (values too large?)")
        payload, header_length = await _maybe_in_thread(
            len(body), oip.encode_response, node.task.name, req.id, results, req.outputs
        )
    if header_length is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(body=payload, content_type="application/octet-stream", headers={oip.HEADER: str(header_length)})


INLINE_BYTES = 64 * 1024  # smaller requests are parsed on the event loop: a thread hop costs more


async def _maybe_in_thread(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if size <= INLINE_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_post(prefix + "/infer", infer)
