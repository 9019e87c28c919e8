"""A real browser for the dashboard tests: Playwright driving the system's Chromium (headless).

Tests that use ``browser`` skip cleanly when Playwright or a Chromium is missing: the system's (``chromium`` on
the PATH, which scripts/browser.sh installs where it can; or GOSSIPFL_CHROMIUM), else one downloaded by
``playwright install chromium`` (which cannot download on every machine)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    explicit = os.environ.get("GOSSIPFL_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CANDIDATES:
        if found := shutil.which(name):
            return found
    return None


@dataclass
class Watched:
    """A page and everything it complained about: console errors and warnings, uncaught exceptions, failed
    requests, and answers of 400 and above."""

    page: Any
    problems: list[str] = field(default_factory=list)

    async def wait_updates(self, n: int, timeout_s: float = 20.0) -> None:
        """Until the dashboard completed ``n`` polls (window.gossipflDashboard.updates)."""
        await self.page.wait_for_function(
            f"() => window.gossipflDashboard && window.gossipflDashboard.updates >= {int(n)}", timeout=timeout_s * 1000
        )

    async def js(self, body: str) -> Any:
        """Evaluate ``() => { body }`` in the page (as a function: the page's CSP forbids eval of strings)."""
        return await self.page.evaluate(f"() => {{ {body} }}")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    path = chromium_path()
    async with playwright.async_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root without it
        try:  # the system's Chromium, else one that `playwright install chromium` downloaded
            b = await p.chromium.launch(executable_path=path, headless=True, args=args)
        except playwright.Error as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            pytest.skip(f"no Chromium to run (apt-get install chromium, or set GOSSIPFL_CHROMIUM): {first}")
        try:
            yield b
        finally:
            await b.close()


async def open_page(browser: Any, url: str, width: int = 1300, height: int = 1000, **context: Any) -> Watched:
    """A fresh context (own session storage) with ``url`` loaded, recording the page's problems."""
    ctx = await browser.new_context(viewport={"width": width, "height": height}, **context)
    page = await ctx.new_page()
    w = Watched(page)
    page.on("console", lambda m: m.type in ("error", "warning") and w.problems.append(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: w.problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: w.problems.append(f"request failed: {r.url} {r.failure}"))
    page.on("response", lambda r: w.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    await page.goto(url)
    return w
