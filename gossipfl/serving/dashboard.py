"""The dashboard pages and their assets, served from files inside the package (no CDN, works offline).

``GET /`` is the page, ``GET /static/NAME`` its scripts, stylesheet and icon. Both are open (they hold no
data: the page reads the node's API with the read token the user gives it, see serving/auth.py). Every
answer carries a Content-Security-Policy that allows scripts, styles and requests from this origin only,
so even a string that slipped into the page unescaped could not run."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from gossipfl.serving.errors import error

STATIC_PREFIX = "/static/"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSETS = web.AppKey("dashboard_assets", dict)
_INDEX = web.AppKey("dashboard_index", str)


def load_assets() -> dict[str, bytes]:
    """Every file of ``gossipfl/serving/static`` by name (read once, when an app is built)."""
    root = resources.files("gossipfl.serving") / "static"
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and _type(f.name) is not None}


def _type(name: str) -> str | None:
    dot = name.rfind(".")
    return TYPES.get(name[dot:]) if dot > 0 else None


def is_page(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets (open routes)."""
    return path == "/" or path.startswith(STATIC_PREFIX)


def asset(assets: dict[str, bytes], name: str) -> web.Response:
    body, kind = assets.get(name), _type(name)
    if body is None or kind is None:
        return error(404, "no such file")
    return web.Response(body=body, headers={"Content-Type": kind, **HEADERS})


async def get_index(request: web.Request) -> web.Response:
    return asset(request.app[_ASSETS], request.app[_INDEX])


async def get_static(request: web.Request) -> web.Response:
    return asset(request.app[_ASSETS], request.match_info["name"])


def add_routes(app: web.Application, index: str = "node.html") -> None:
    """``GET /`` (the page ``index``) and ``GET /static/{name}``."""
    app[_ASSETS] = load_assets()
    app[_INDEX] = index
    app.router.add_get("/", get_index)
    app.router.add_get(STATIC_PREFIX + "{name}", get_static)
