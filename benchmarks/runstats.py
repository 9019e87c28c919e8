"""What the benchmarks take from testbed runs and how they summarise them: the accuracy and bytes curve
of one run (``results.json`` of ``gossipfl testbed``) and the 95% t-interval over runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # by df


def curves(res: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Time, mean and min accuracy over nodes, and mean MB sent per node, at each sample."""
    nodes = list(res["nodes"].values())
    length = min(len(v["accuracy"]) for v in nodes)
    t = np.array([nodes[0]["accuracy"][i][0] for i in range(length)])
    acc = np.array([[v["accuracy"][i][1] or 0.0 for v in nodes] for i in range(length)])
    sent = np.array([[v["bytes_sent"][i][1] for v in nodes] for i in range(length)]) / 1e6
    return t, acc.mean(axis=1), acc.min(axis=1), sent.mean(axis=1)


def compact_curve(res: dict) -> list[list[float]]:
    """``curves`` as rows [seconds, mean accuracy, min accuracy, mean MB sent per node], rounded to commit."""
    return [
        [round(float(a), 2), round(float(b), 4), round(float(c), 4), round(float(d), 3)]
        for a, b, c, d in zip(*curves(res), strict=True)
    ]


def half_width95(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean of ``values`` (at least two)."""
    df = len(values) - 1
    if df in T95:
        t = T95[df]
    else:  # scipy comes with the test extra (scikit-learn); only needed past 10 runs
        from scipy import stats

        t = float(stats.t.ppf(0.975, df))
    return t * statistics.stdev(values) / len(values) ** 0.5


def mean_and_range(values: list[float] | None, fmt: str, unit: str = "", around: str = " [{}, {}]") -> str:
    """The mean of ``values`` in format ``fmt`` (and ``unit``), then their min and max in ``around``
    ("-" for none; the range only when there are several)."""
    if not values:
        return "-"
    spread = around.format(format(min(values), fmt), format(max(values), fmt)) if len(values) > 1 else ""
    return f"{format(statistics.mean(values), fmt)}{unit}{spread}"


def saved_runs(path: Path) -> tuple[list, dict]:
    """A benchmark's saved NAME.json as ``--report-only`` rewrites the report from it: (its runs, the rest of
    what it saved, less the rows the report derives)."""
    saved = json.loads(path.read_text())
    runs = saved.pop("runs")
    saved.pop("rows", None)
    return runs, saved
