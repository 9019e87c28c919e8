"""The end of a run: the summary written to ``results.json`` and the final table."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from gossipfl.testbed.options import (
    TestbedOptions,
    WatchedNode,
)


def summarize(
    nodes: list[WatchedNode],
    series: list[dict],
    opts: TestbedOptions,
    exit_codes: dict,
    *,
    startup_s: float | None = None,
    resources: dict[str, Any] | None = None,
) -> dict:
    final = {}
    for n in nodes:
        s = n.last_status
        final[n.id] = {
            "accuracy": s.get("metrics", {}).get("accuracy"),
            "loss": s.get("metrics", {}).get("loss"),
            "age": s.get("age"),
            "steps": s.get("steps"),
            "samples": s.get("samples"),
            "peers": len(s.get("peers", [])),
            "exchanges": s.get("exchanges"),
            "merge": s.get("merge"),
            "exit_code": exit_codes.get(n.id),
        }
    accs = [f["accuracy"] for f in final.values() if f["accuracy"] is not None]
    first = next((r for r in series if r["consensus_distance"] is not None), None)
    last = series[-1] if series else None
    return {
        "mode": opts.mode,
        "options": {**asdict(opts), "extra_node_args": redacted(opts.extra_node_args)},
        "nodes": {
            n.id: {
                "url": n.url,
                "partition": f"{n.index}/{opts.nodes}",
                "accuracy": n.accuracy,
                "loss": n.loss,
                "bytes_sent": n.bytes_sent,
            }
            for n in nodes
        },
        "consensus": series,
        "final": final,
        "summary": {
            "accuracy_mean": float(np.mean(accs)) if accs else None,
            "accuracy_min": float(np.min(accs)) if accs else None,
            "accuracy_max": float(np.max(accs)) if accs else None,
            "accuracy_spread": float(np.max(accs) - np.min(accs)) if accs else None,
            "consensus_distance_first": first["consensus_distance"] if first else None,
            "consensus_distance_last": last["consensus_distance"] if last else None,
            # the spread as a fraction of the size of the model: nodes that train from one shared initial
            # model start close, so this, not the first-to-last ratio, says whether gossip holds them together
            "consensus_distance_relative_last": relative(last),
            # only meaningful for pure averaging: training moves the mean on purpose
            "mean_shift_relative": series[-1].get("mean_shift_relative") if series and opts.no_train else None,
            "all_exited_cleanly": all(c == 0 for c in exit_codes.values()),
            "startup_s": round(startup_s, 3) if startup_s is not None else None,
        },
        "resources": resources,
    }


def relative(row: dict | None) -> float | None:
    """Consensus distance over the norm of the network mean (None when either is missing or zero)."""
    if not row or row.get("consensus_distance") is None or not row.get("mean_norm"):
        return None
    return row["consensus_distance"] / row["mean_norm"]


def final_table(result: dict) -> str:
    lines = [f"{'node':<16} {'accuracy':>8} {'loss':>7} {'exchanges ok':>12} {'exit':>4}"]
    for node_id, f in result["final"].items():
        acc = f"{f['accuracy']:.4f}" if f["accuracy"] is not None else "-"
        loss = f"{f['loss']:.3f}" if f["loss"] is not None else "-"
        ok = (f["exchanges"] or {}).get("ok", 0)
        lines.append(f"{node_id:<16} {acc:>8} {loss:>7} {ok:>12} {f['exit_code']!s:>4}")
    s = result["summary"]
    if s["accuracy_mean"] is not None:
        lines.append(
            f"accuracy mean {s['accuracy_mean']:.4f}  min {s['accuracy_min']:.4f}  "
            f"max {s['accuracy_max']:.4f}  spread {s['accuracy_spread']:.4f}"
        )
    if s["consensus_distance_first"] is not None and s["consensus_distance_last"] is not None:
        rel = s.get("consensus_distance_relative_last")
        share = f" ({100 * rel:.2g}% of the mean model's norm)" if rel is not None else ""
        lines.append(
            f"consensus distance {s['consensus_distance_first']:.3e} -> {s['consensus_distance_last']:.3e}{share}"
        )
    return "\n".join(lines)


SECRET_FLAGS = ("--read-token",)


def redacted(args: tuple[str, ...] | list[str]) -> list[str]:
    """Node arguments as results.json keeps them: the value of a secret given on the command line is not
    written to disk (files are named, their content never is)."""
    out, hide = [], False
    for a in args:
        if hide:
            out.append("***")
            hide = False
        elif a in SECRET_FLAGS:
            out.append(a)
            hide = True
        elif a.startswith(tuple(f + "=" for f in SECRET_FLAGS)):
            out.append(a.split("=", 1)[0] + "=***")
        else:
            out.append(a)
    return out
