"""``gossipfl-healthcheck``: a container's health check, exit 0 when the node in this container answers
``GET /v2/health/live`` (``--ready``: ``/v2/health/ready``, a trained or merged model) within the timeout.

It reads the node's own settings from the environment the node reads them from (GOSSIPFL_PORT,
GOSSIPFL_HOST when the node binds one address, GOSSIPFL_TLS_CERT for https, not verified: the check asks
only whether this process answers); settings given as ``gossipfl node`` arguments or in a
``GOSSIPFL_CONFIG`` file are not seen, so in a container give the port and TLS files as environment. It
ignores proxy settings (``http_proxy`` would send a check of 127.0.0.1 to the proxy), imports nothing
beyond the standard library (a check every few seconds must not load torch), and sends no credentials:
both health routes stay open under a cluster key, a read token or mutual TLS."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence


def health_url(env: Mapping[str, str], ready: bool = False) -> str:
    scheme = "https" if env.get("GOSSIPFL_TLS_CERT") else "http"
    port = env.get("GOSSIPFL_PORT") or "8470"
    host = env.get("GOSSIPFL_HOST") or "0.0.0.0"
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # a node on every address answers on loopback
    return f"{scheme}://{host}:{port}/v2/health/{'ready' if ready else 'live'}"


def check(url: str, timeout: float) -> str | None:
    """None when ``url`` answers 200, else why not (one line)."""
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=timeout) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", None) or e)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gossipfl-healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ready", action="store_true", help="check readiness instead of liveness")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    args = parser.parse_args(argv)
    url = health_url(os.environ, args.ready)
    why = check(url, args.timeout)
    if why is not None:
        print(f"gossipfl-healthcheck: {url}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
