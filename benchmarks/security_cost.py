"""The cost of security: one exchange's duration, open against cluster key (HMAC) against mutual TLS.

Two nodes per mode (open, hmac, mtls, hmac+mtls), all in this process on one event loop, on loopback; each
exchange is started by hand (the nodes' own gossip is idle) and timed from the initiator's snapshot to the
merge applied on both sides. Modes take turns within each repeat (paired: the machine's drift hits all of
them alike), for `digits` (4,810 parameters, 19 KB on the wire) and for a model of `--mb` MB (the synthetic
task plus one large parameter; its data stays small).

    python benchmarks/security_cost.py --repeats 200 --big-repeats 10 --mb 100

Writes benchmarks/results/security_cost.{md,json}: per model and mode the median and 90th percentile of
the duration, and the median of the paired ratio to the open exchange of the same repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gossipfl.config import NodeConfig
from gossipfl.learning.tasks.synthetic import SyntheticTask
from gossipfl.node import Node
from gossipfl.security import certs

RESULTS = Path(__file__).parent / "results"
MODES = ("open", "hmac", "mtls", "hmac+mtls")


class PaddedTask(SyntheticTask):
    """synthetic, with one extra parameter of ``mb`` MB: a model of that size on small data."""

    def __init__(self, mb: float) -> None:
        super().__init__(dim=20, classes=2, samples=200)
        self.mb = mb

    def build_model(self) -> nn.Module:
        model = nn.Sequential(nn.Linear(self.dim, self.classes))
        model.register_parameter("padding", nn.Parameter(torch.zeros(int(self.mb * 1e6 / 4))))
        return model


def configs(mode: str, folder: Path, key: Path) -> list[NodeConfig]:
    out, cluster = [], f"cost-{uuid.uuid4().hex[:6]}"
    for i, node_id in enumerate((f"{mode.replace('+', '-')}-a", f"{mode.replace('+', '-')}-b")):
        extra: dict = {}
        if "hmac" in mode:
            extra["secret_file"] = str(key)
        if "mtls" in mode:
            extra.update(
                tls_cert=f"{folder}/{node_id}.crt", tls_key=f"{folder}/{node_id}.key", tls_ca=f"{folder}/ca.crt"
            )
        else:
            extra["id"] = node_id
        out.append(
            NodeConfig(
                host="127.0.0.1", port=0, discovery=("static",), cluster=cluster,
                no_train=True, seed=i, gossip_interval=3600.0, eval_interval=3600.0, **extra,
            )
        )  # fmt: skip
    return out


async def measure(task_name: str, task: object, repeats: int, folder: Path, key: Path) -> dict[str, list[float]]:
    pairs: dict[str, tuple[Node, Node]] = {}
    try:
        for mode in MODES:
            a, b = (Node(c, task=task) for c in configs(mode, folder, key))  # type: ignore[arg-type]
            await a.start()
            await b.start()
            a.peers.upsert(b.id, b.url, b.task.name, "static")
            pairs[mode] = (a, b)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(repeats + 1):  # the first round warms connections up and is dropped
            for mode in MODES:
                a, b = pairs[mode]
                t0 = time.perf_counter()
                result = await a.gossiper.exchange(a._session, a.peers.get(b.id))
                while b.gossiper._merging:  # the responder applies its commit just after answering
                    await asyncio.sleep(0.0005)
                took = time.perf_counter() - t0
                if result != "ok":
                    raise RuntimeError(f"{task_name} {mode}: exchange {result}")
                if r:
                    times[mode].append(took)
        return times
    finally:
        for a, b in pairs.values():
            await a.stop()
            await b.stop()


def summarise(name: str, nbytes: int, times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for mode in MODES:
        t = np.array(times[mode])
        ratio = np.array(times[mode]) / np.array(times["open"])
        rows.append(
            {
                "model": name,
                "bytes": nbytes,
                "mode": mode,
                "n": len(t),
                "median_ms": float(np.median(t) * 1e3),
                "p90_ms": float(np.percentile(t, 90) * 1e3),
                "paired_ratio_median": float(np.median(ratio)),
                "paired_ratio_iqr": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="exchanges per mode on digits")
    ap.add_argument("--big-repeats", type=int, default=10, help="exchanges per mode on the large model")
    ap.add_argument("--mb", type=float, default=100.0, help="size of the large model in MB (0: skip it)")
    ap.add_argument("--name", default="security_cost")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.ERROR)
    from gossipfl.learning.registry import get_task
    from gossipfl.protocol import wire

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, key = Path(tmp) / "pki", Path(tmp) / "cluster.key"
        key.write_bytes(bytes(range(32, 64)))
        certs.init_ca(folder)
        for mode in MODES:
            for side in "ab":
                certs.issue(folder, f"{mode.replace('+', '-')}-{side}")
        plan = [("digits", get_task("digits"), args.repeats)]
        if args.mb > 0:
            plan.append((f"{args.mb:g} MB", PaddedTask(args.mb), args.big_repeats))
        for name, task, repeats in plan:
            times = asyncio.run(measure(name, task, repeats, folder, key))
            spec = wire.spec_of({k: v.detach().numpy() for k, v in task.build_model().state_dict().items()})
            rows += summarise(name, wire.max_message_size(spec), times)
            for r in rows[-len(MODES) :]:
                print(
                    f"{name:>8} {r['mode']:>10}: median {r['median_ms']:9.2f} ms  p90 {r['p90_ms']:9.2f} ms  "
                    f"x{r['paired_ratio_median']:.3f} of open",
                    flush=True,
                )
    lines = [
        "| model | message | mode | exchanges | median | p90 | median of paired ratio to open (IQR) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lo, hi = r["paired_ratio_iqr"]
        lines.append(
            f"| {r['model']} | {r['bytes'] / 1e6:.3g} MB | {r['mode']} | {r['n']} | {r['median_ms']:.2f} ms | "
            f"{r['p90_ms']:.2f} ms | {r['paired_ratio_median']:.3f} ({lo:.3f}-{hi:.3f}) |"
        )
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(
        f"# {args.name}\n\n`python benchmarks/security_cost.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
