"""The OpenAPI 3.1 description of a node's HTTP API (served at ``GET /v1/openapi.json``).

A test checks that every route the app serves is described here, and nothing else.
"""

from __future__ import annotations

from typing import Any

from gossipfl.version import __version__

ERROR = {"$ref": "#/components/responses/Error"}
JSON = "application/json"
MSGPACK = "application/msgpack"


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema or {"type": "object"}}}}


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {}, "text/javascript": {}, "text/css": {}}}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def _model_params(versioned: bool) -> list[dict[str, Any]]:
    params = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    if versioned:
        params.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": ["1"]}})
    return params


def _v2_model_paths(versioned: bool) -> dict[str, Any]:
    prefix = "/v2/models/{name}" + ("/versions/{version}" if versioned else "")
    params = _model_params(versioned)
    tensor = {"$ref": "#/components/schemas/Tensor"}
    return {
        prefix: {
            "get": _op(
                "Model metadata: input and output tensors (-1 = batch axis)",
                {"200": _json("model metadata"), "404": ERROR},
                parameters=params,
            )
        },
        prefix + "/ready": {
            "get": _op(
                "Is the model ready (trained or merged at least once)",
                {"200": _json("ready"), "400": ERROR, "404": ERROR},
                parameters=params,
            )
        },
        prefix + "/infer": {
            "post": _op(
                "Run the served model (JSON tensors, or the binary tensor data extension)",
                {
                    "200": {
                        "description": "outputs; binary outputs follow a JSON header of "
                        "Inference-Header-Content-Length bytes",
                        "content": {JSON: {"schema": {"type": "object"}}, "application/octet-stream": {}},
                    },
                    "400": ERROR,
                    "404": ERROR,
                    "408": ERROR,
                    "413": ERROR,
                    "503": ERROR,
                },
                parameters=[
                    *params,
                    {
                        "name": "Inference-Header-Content-Length",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                        "description": "length of the JSON header when binary tensor data follows it",
                    },
                ],
                requestBody={
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "required": ["inputs"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "inputs": {"type": "array", "items": tensor},
                                    "outputs": {"type": "array", "items": {"type": "object"}},
                                    "parameters": {"type": "object"},
                                },
                            }
                        },
                        "application/octet-stream": {},
                    },
                },
            )
        },
    }


OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/", "/static/{name}")
MEMBER_SECURITY = [{"gossipfl_signature": []}, {"mutual_tls": []}]
READ_SECURITY = [{"bearer": []}, *MEMBER_SECURITY]
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "the node's read token, when it runs with --read-token(-file); absent otherwise",
    },
    "gossipfl_signature": {
        "type": "apiKey",
        "in": "header",
        "name": "Gossipfl-Signature",
        "description": "HMAC-SHA256 under the cluster key (--secret-file): see docs/http-api.md, Signatures",
    },
    "mutual_tls": {"type": "mutualTLS", "description": "a client certificate from the cluster CA (--tls-ca)"},
}


def _secured(doc: dict[str, Any]) -> dict[str, Any]:
    """Every operation but the health checks says who may call it, and that it may answer 401 (a node that
    runs open requires nothing: the alternatives then do not apply)."""
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if path in OPEN_PATHS:
                op["security"] = []
                continue
            member = path.startswith(("/v1/gossip", "/v1/group"))
            op["security"] = MEMBER_SECURITY if member else READ_SECURITY
            op["responses"]["401"] = ERROR
    doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    return doc


def document(model_name: str) -> dict[str, Any]:
    return _secured(_document(model_name))


def _document(model_name: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gossipfl node",
            "version": __version__,
            "description": f"One gossipfl node. It serves the model {model_name!r} (the task's name). Every "
            "error answers with the Error shape.",
        },
        "paths": {
            "/v1/status": {"get": _op("Node status: id, task, model age, peers, metrics", {"200": _json("status")})},
            "/v1/history": {
                "get": _op(
                    "Evaluations over the run (t, age, steps, accuracy, loss, epsilon; thinned further back) and the "
                    "last 100 exchanges, both sides (t, peer, role, result, duration_s, bytes_sent, bytes_received, "
                    "distance: relative to this node's model, error), after the sequence numbers given; now: this "
                    "node's clock. The dashboard polls it",
                    {"200": _json("history"), "400": ERROR},
                    parameters=[
                        {"name": n, "in": "query", "required": False, "schema": {"type": "integer", "default": 0}}
                        for n in ("evals_after", "exchanges_after")
                    ],
                )
            },
            "/v1/peers": {
                "get": _op(
                    "Peers this node knows that are not failing: id, url, task, source (mdns, static, dns, pex, "
                    "inbound), alive, failures, busy, last_ok_s_ago (last contact), retry_in_s; peer exchange "
                    "reads it",
                    {"200": _json("peer list")},
                )
            },
            "/v1/model": {
                "get": _op(
                    "Download the model",
                    {
                        "200": {
                            "description": "msgpack: the gossip payload of the working model; safetensors: the "
                            "served model (metadata node_id, age, task)",
                            "content": {MSGPACK: {}, "application/octet-stream": {}},
                        },
                        "400": ERROR,
                        "503": ERROR,
                    },
                    parameters=[
                        {
                            "name": "format",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["msgpack", "safetensors"], "default": "msgpack"},
                        }
                    ],
                )
            },
            "/v1/gossip": {
                "post": _op(
                    "Phase 1 of an exchange (prepare): the body is a peer's state (msgpack wire message with "
                    "its exchange id xid); the reply is this node's state. Nothing is merged until the peer "
                    "commits. A retried prepare gets the same reply; one of a decided xid gets 409",
                    {
                        "200": {"description": "this node's state, same xid", "content": {MSGPACK: {}}},
                        "400": ERROR,
                        "408": ERROR,
                        "409": ERROR,
                        "413": ERROR,
                        "503": ERROR,
                    },
                    requestBody={"required": True, "content": {MSGPACK: {}}},
                )
            },
            "/v1/gossip/{xid}/{decision}": {
                "post": _op(
                    "Phase 2 of an exchange: commit (merge, once) or abort a prepared exchange. This node "
                    "decides; every call about one xid gets the same outcome",
                    {
                        "200": _json("{xid, outcome: committed or aborted, reason (when aborted)}"),
                        "400": ERROR,
                    },
                    parameters=[
                        {"name": "xid", "in": "path", "required": True, "schema": {"type": "string"}},
                        {
                            "name": "decision",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": ["commit", "abort"]},
                        },
                    ],
                )
            },
            **_group_paths(),
            "/v1/openapi.json": {"get": _op("This document", {"200": _json("OpenAPI 3.1 document")})},
            "/metrics": {
                "get": _op(
                    "Prometheus metrics (text format 0.0.4, or OpenMetrics when the Accept header asks)",
                    {"200": {"description": "exposition", "content": {"text/plain": {}}}},
                )
            },
            "/": {"get": _op("The node's dashboard (an HTML page that reads this API)", {"200": _html("page")})},
            "/static/{name}": {
                "get": _op(
                    "The dashboard's scripts, stylesheet and icon (files inside the package)",
                    {"200": _html("asset"), "404": ERROR},
                    parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                )
            },
            "/v2/health/live": {"get": _op("Liveness", {"200": _json("live")})},
            "/v2/health/ready": {"get": _op("Readiness", {"200": _json("ready"), "400": ERROR})},
            "/v2": {"get": _op("Server metadata and supported extensions", {"200": _json("server metadata")})},
            **_v2_model_paths(versioned=False),
            **_v2_model_paths(versioned=True),
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string", "description": "what was wrong or expected"}},
                },
                "Tensor": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "data": {"type": "array", "description": "row-major values (may be nested)"},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                        },
                    },
                },
            },
            "responses": {
                "Error": {
                    "description": "error",
                    "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        },
    }


def _group_paths() -> dict[str, Any]:
    """Secure group rounds (--secure-group; docs/privacy.md). A node without it answers them 409."""
    refusals = {"400": ERROR, "408": ERROR, "409": ERROR, "413": ERROR}
    body = {"requestBody": {"required": True, "content": {MSGPACK: {}}}}
    return {
        "/v1/group": {
            "post": _op(
                "A secure group round's invite (msgpack: round id, member ids): this node holds the round and "
                "answers with its public key for it (409 when it is in another round)",
                {"200": {"description": "this node's key for the round", "content": {MSGPACK: {}}}, **refusals},
                **body,
            )
        },
        "/v1/group/hello": {
            "post": _op(
                "A member that knows too few peers for a round says where it listens (msgpack: sender, port)",
                {"200": _json("{id}"), **refusals},
                **body,
            )
        },
        "/v1/group/{round}/{phase}": {
            "post": _op(
                "mask: every member's key in, this node's masked model out (msgpack); commit: the sum of the "
                "masked models, applied once; abort (no body). The round's initiator alone may call them",
                {
                    "200": {"description": "masked model, or {round, outcome, reason}", "content": {MSGPACK: {}}},
                    **refusals,
                },
                parameters=[
                    {"name": "round", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "phase",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["mask", "commit", "abort"]},
                    },
                ],
            )  # fmt: skip
        },
    }
