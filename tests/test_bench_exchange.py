"""benchmarks/exchange.py runs end to end on a tiny model: every method measured, every number positive
(no timing thresholds: the numbers depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from exchange_report import ROWS, rows  # noqa: E402

pytest.importorskip("matplotlib")


@pytest.mark.timeout(180)
def test_the_exchange_benchmark_measures_every_method(tmp_path):
    out = tmp_path / "exchange"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "exchange.py"), "--sizes", "0.5", "--repeats", "3"]
    cmd += ["--out", str(out), "--port-base", "19060"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    printed = [line for line in r.stdout.splitlines() if line.split()[:1] == ["0.5"] and " MB " not in line]
    assert len(printed) == len(ROWS)
    for name, line in zip(ROWS, printed, strict=True):
        assert name in line and "FAILED" not in line, line
    res = json.loads(out.with_suffix(".json").read_text())
    (size,) = res["sizes"]
    assert size["model_bytes"] > 0.49 * 2**20
    table = rows(size)
    assert set(table) == set(ROWS)
    for name, x in table.items():
        assert x["p50_s"] > 0 and x["p99_s"] >= x["p50_s"] and x["mbps"] > 0, (name, x)
        if name not in ROWS[:2]:  # every server or node process: a peak above its idle RSS
            assert x["above_mb"] is not None and x["multiple"] is not None, (name, x)
    ex = size["exchange"]
    assert ex["a"]["ok"] >= 3 and ex["b"]["served"] >= 3
    assert ex["bytes_sent_per_exchange"] > 0 and ex["bytes_received_per_exchange"] > 0
    assert out.with_suffix(".md").read_text().count("| 0.5 |") >= len(ROWS)
    assert out.with_suffix(".png").stat().st_size > 0
