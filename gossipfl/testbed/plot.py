"""``convergence.png`` at the end of a run: every node's accuracy and the consensus distance over time.

matplotlib is optional (``pip install 'gossipfl[plot]'``) and imported only inside ``convergence_figure``:
the node never imports it, and the Agg canvas is used directly, so a caller's pyplot backend is left alone."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from gossipfl.testbed.report import relative

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SKIPPED = "testbed: convergence.png skipped: matplotlib is not installed (pip install 'gossipfl[plot]')"
SIZE_IN, DPI = (11.0, 4.0), 100  # 1100 x 400 pixels
MAX_LEGEND = 10  # node ids in the legend up to this many nodes; beyond, only the mean is named


def plot_convergence(result: dict, path: Path) -> Path | None:
    """Write ``convergence_figure(result)`` to ``path`` as a PNG; None (nothing written) when matplotlib is
    missing."""
    try:
        fig = convergence_figure(result)
    except ImportError:
        return None
    fig.savefig(path, format="png", dpi=DPI)
    return path


def convergence_figure(result: dict) -> Figure:
    """``result`` (what ``report.summarize`` returns) drawn: left, each node's accuracy (thin) and their
    mean (bold); right, the consensus distance, relative to the mean model's norm when every row has that
    norm, on a log scale when it has positive values. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    acc_ax, cd_ax = fig.subplots(1, 2)
    _accuracy(acc_ax, result["nodes"])
    _consensus(cd_ax, result["consensus"])
    opts = result.get("options", {})
    fig.suptitle(f"{len(result['nodes'])} nodes, task {opts.get('task', '?')}, mode {result.get('mode', '?')}")
    fig.tight_layout()
    return fig


def _accuracy(ax: Axes, nodes: dict) -> None:
    by_t: dict[float, list[float]] = defaultdict(list)
    for node_id, node in nodes.items():
        pts = [(t, a) for t, a in node["accuracy"] if a is not None]
        for t, a in pts:
            by_t[t].append(a)
        label = node_id if len(nodes) <= MAX_LEGEND else None
        ax.plot([t for t, _ in pts], [a for _, a in pts], lw=0.8, alpha=0.6, label=label)
    ts = sorted(by_t)
    ax.plot(ts, [sum(by_t[t]) / len(by_t[t]) for t in ts], lw=2.5, color="black", label="mean")
    ax.set(title="test accuracy", xlabel="seconds since sampling began", ylabel="accuracy", ylim=(0, 1))
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(alpha=0.3)


def _consensus(ax: Axes, series: list[dict]) -> None:
    rows = [r for r in series if r.get("consensus_distance") is not None]
    rel = bool(rows) and all(r.get("mean_norm") for r in rows)
    ys = [relative(r) if rel else r["consensus_distance"] for r in rows]
    ax.plot([r["t"] for r in rows], ys, marker=".", lw=1.5)
    if any(y > 0 for y in ys):
        ax.set_yscale("log")
    ylabel = "distance / mean model's norm" if rel else "RMS distance to the mean model"
    ax.set(title="consensus distance", xlabel="seconds since sampling began", ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
