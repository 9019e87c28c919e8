"""Client side of a node's model-serving API, for ``gossipfl pull`` and ``gossipfl query``.

Plain HTTP with the standard library; the infer request uses the Open Inference Protocol's binary
tensor data extension, as ``tritonclient`` does.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from gossipfl.serving import oip


class ClientError(Exception):
    """The node could not be reached or refused the request (one line, shown to the user)."""


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def auth_headers(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header a node's read token needs (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A node never redirects; following one would hand the read token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None


def _opener(cacert: str | None) -> urllib.request.OpenerDirector:
    """No redirects; for an https node, its certificate checked against ``cacert`` (the cluster CA), by
    chain only: a node's certificate names its node id, not the address it is reached at."""
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if cacert:
        ctx = ssl.create_default_context(cafile=cacert)
        ctx.check_hostname = False
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    return urllib.request.build_opener(*handlers)


def _request(
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    cacert: str | None = None,
):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with _opener(cacert).open(req, timeout=timeout) as resp:
            return resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            detail = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            detail = body[:200].decode(errors="replace")
        hint = " (give the node's read token: --token or GOSSIPFL_TOKEN)" if e.code == 401 else ""
        raise ClientError(f"{url}: HTTP {e.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise ClientError(f"{url}: {getattr(e, 'reason', e)}") from None


def get_json(url: str, timeout: float = 30.0, token: str | None = None, cacert: str | None = None) -> Any:
    body, _ = _request(url, headers=auth_headers(token), timeout=timeout, cacert=cacert)
    try:
        return json.loads(body)
    except ValueError:
        raise ClientError(f"{url}: the answer is not JSON (is this a gossipfl node?)") from None


def pull(
    url: str, out: str | Path, timeout: float = 30.0, token: str | None = None, cacert: str | None = None
) -> dict[str, Any]:
    """Save a node's served model as a safetensors file; return its metadata and tensor count."""
    from safetensors import SafetensorError, safe_open

    body, _ = _request(
        base_url(url) + "/v1/model?format=safetensors", headers=auth_headers(token), timeout=timeout, cacert=cacert
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    try:
        with safe_open(tmp, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        os.unlink(tmp)
        raise ClientError(f"{url}: the answer is not a safetensors file: {e}") from None
    os.replace(tmp, out)
    return {"file": str(out), "bytes": len(body), "metadata": meta, "tensors": tensors}


def load_input(path: str | Path) -> np.ndarray:
    """Rows of raw features from ``.npy`` (read without pickle) or ``.json`` (a list of rows, or one row)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            x = np.asarray(json.loads(path.read_text()), dtype=np.float64)
        else:
            raise ClientError(f"input {path}: expected a .npy or .json file")
    except (OSError, ValueError) as e:
        raise ClientError(f"input {path}: {e}") from None
    if x.dtype.kind not in "biuf":
        raise ClientError(f"input {path}: values must be numeric, got {x.dtype}")
    return x


def query(
    url: str,
    x: np.ndarray,
    model: str | None = None,
    timeout: float = 30.0,
    token: str | None = None,
    cacert: str | None = None,
) -> dict[str, np.ndarray]:
    """Run ``x`` through a node's served model with one OIP v2 infer request (binary tensors both ways)."""
    root = base_url(url)
    try:
        name = model or get_json(root + "/v1/status", timeout, token, cacert)["task"]
        meta = get_json(f"{root}/v2/models/{name}", timeout, token, cacert)
        (spec,) = meta["inputs"]
        spec["datatype"], spec["shape"], spec["name"]  # noqa: B018 - checked here, used below
    except (KeyError, TypeError, ValueError):
        raise ClientError(f"{root}: unexpected model metadata (only single-input models are supported)") from None
    sample = tuple(spec["shape"][1:])
    if x.shape == sample:
        x = x[None]  # one sample: make it a batch of one
    if tuple(x.shape[1:]) != sample:
        raise ClientError(f"input shape {list(x.shape)}: model {name!r} expects [batch, {', '.join(map(str, sample))}]")
    raw = np.ascontiguousarray(x.astype(oip.DATATYPES[spec["datatype"]].newbyteorder("<"))).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": spec["name"],
                    "datatype": spec["datatype"],
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body, headers = _request(
        f"{root}/v2/models/{name}/infer",
        data=header + raw,
        headers={"Content-Type": "application/octet-stream", oip.HEADER: str(len(header)), **auth_headers(token)},
        timeout=timeout,
        cacert=cacert,
    )
    return decode_response(body, headers.get(oip.HEADER))


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    n = int(header_length) if header_length is not None else len(body)
    doc, offset, out = json.loads(body[:n]), n, {}
    for o in doc["outputs"]:
        dtype = oip.DATATYPES[o["datatype"]].newbyteorder("<")
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.asarray(o["data"], dtype=dtype).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(
                o["shape"]
            )
            offset += size
    return out
