#!/usr/bin/env python3
"""Regenerate the dashboards' screenshots in docs/images: a testbed of N nodes (inproc, digits) runs with
``--dashboard-port 0``; after WAIT seconds of its run this script saves, in headless Chromium (the system's,
as tests/browser.py finds it; GOSSIPFL_CHROMIUM to choose), the network view (network-dashboard.png) and
the first node's own page (node-dashboard.png), full page, 1300 px wide; then the testbed ends normally.

    .venv/bin/python scripts/screenshots.py --nodes 6 --wait 20

Everything runs on 127.0.0.1; the testbed writes its results to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH = 1300


def chromium() -> str:
    path = os.environ.get("GOSSIPFL_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM)), None)
    if not path:
        sys.exit("screenshots: no Chromium found (apt-get install chromium, or set GOSSIPFL_CHROMIUM)")
    return path


async def shoot(url: str, out: Path, updates: int) -> None:
    """Open ``url``, wait for ``updates`` polls of its dashboard, save the whole page to ``out``."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = await p.chromium.launch(executable_path=chromium(), headless=True, args=args)
        try:
            page = await browser.new_page(viewport={"width": WIDTH, "height": 900})
            await page.goto(url)
            await page.wait_for_function(
                f"() => window.gossipflDashboard && window.gossipflDashboard.updates >= {updates}", timeout=30_000
            )
            await page.screenshot(path=str(out), full_page=True)
        finally:
            await browser.close()
    print(f"screenshots: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--wait", type=float, default=20.0, help="seconds of the run before the screenshots")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the two PNG files")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium()  # fail before starting anything
    with tempfile.TemporaryDirectory(prefix="gossipfl-screenshots-") as tmp:
        cmd = [sys.executable, "-m", "gossipfl", "testbed", "--mode", "inproc", "--nodes", str(args.nodes),
               "--task", args.task, "--duration", str(args.wait + 15), "--out", tmp, "--quiet",
               "--dashboard-port", "0"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            page = ""
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("testbed: dashboard at "):
                    page = line.split(" at ")[1].strip()
                if "running for" in line:  # every node is up: the run starts now
                    break
            if not page:
                sys.exit("screenshots: the testbed did not serve a dashboard")
            time.sleep(args.wait)
            asyncio.run(shoot(page, out / "network-dashboard.png", updates=2))
            with urllib.request.urlopen(page + "api/network", timeout=10) as r:
                first = json.load(r)["nodes"][0]["url"]
            asyncio.run(shoot(first + "/", out / "node-dashboard.png", updates=3))
            for line in proc.stdout:
                print(line, end="", flush=True)
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
