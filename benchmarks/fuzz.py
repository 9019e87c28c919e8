"""Fuzzing at scale: hypothesis-generated bodies against every route of a node that takes one.

Two real `gossipfl node` processes on loopback, with `--no-train` and no peers (their models can change only
through a committed merge): one open, one members-only (`--secret-file`). The requests, drawn by the
generators of `tests/test_fuzz.py` (which sends a few hundred of them in CI), go one at a time, each kind
taking its share of `--requests`:

- gossip-bytes (10%), gossip-msgpack (10%), gossip-fields (18%), gossip-bitflips (12%): `POST /v1/gossip`
  on the open node with arbitrary bytes, arbitrary msgpack structures (deep nesting, ext types, odd keys),
  valid messages with fields mutated (dropped, repeated, wrong types, out-of-range ages, weights, ports and
  versions, odd senders and xids, tensors with wrong dtypes, shapes, lengths, NaN and Inf), and valid
  encodings with bits flipped, cut, spliced or duplicated;
- signed-junk (16%): all of those, correctly signed with the cluster key, to the members-only node (an
  authenticated member sending junk: the body reaches the decoder);
- bad-signature (8%): valid and junk bodies unsigned or signed wrong in each of 13 ways (another key, stale,
  replayed, for another body, path, method or recipient, a header with one character changed...): 401 only;
- decision (6%): `POST /v1/gossip/{xid}/{commit|abort}` with ids of every shape and bodies of any bytes, on
  both nodes (signed, unsigned, replayed on the members-only one);
- infer-json (10%), infer-binary (6%): Open Inference Protocol requests, JSON and binary extension, mutated
  (shapes, datatypes, sizes, header lengths, non-UTF-8, deep nesting, 10,000-digit numbers);
- framing (4%): whole requests over a raw socket whose framing lies (Content-Length too long or short,
  malformed or repeated, chunked and broken chunks, unknown transfer and content encodings, junk gzip).

Every gossip body that reaches the decoder is also checked by the fuzzer itself against the wire contract
(`invalid_because` in the test file, written apart from `protocol/wire.py`): an invalid one must get a 4xx,
a valid one a 200 (the prepare: the fuzzer aborts it at once; a prepare never changes a model), a 409 or a
413. Each kind runs in chunks of at most 500 requests (hypothesis seed `--seed` + the chunk's number), and
after every chunk both models are compared with the first reading (`GET /v1/model`, `age`, `merges`).

Failures: any 5xx; an answer that is not a 200 or a 4xx, or not the one expected (a 401 for every bad
signature, a 200 for a decision on a well-formed id never prepared, a 4xx for an invalid message...); a
prepared exchange whose abort fails; no answer within 10 s, or a reset (a clean close after the client ended
its side mid-body is counted as "closed", not a failure); a model change; and any ERROR record, traceback or
stray line in a node's log.

    python benchmarks/fuzz.py --requests 10000

Writes benchmarks/results/fuzz.{md,json}: per kind the requests, answers by status, failures (with their
inputs, hex, truncated), whether a model changed, and requests per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_fuzz import Fuzzer, Target, kinds, run_kind, targets  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CHUNK = 500
MAX_FAILURES_KEPT = 200


def shares(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` split by ``weights`` (largest remainders), every kind at least one."""
    raw = {k: total * w / sum(weights.values()) for k, w in weights.items()}
    out = {k: max(1, int(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - int(raw[k]), reverse=True)[: max(0, total - sum(out.values()))]:
        out[k] += 1
    return out


def fuzz(nodes: dict[str, Target], total: int, seed: int) -> dict:
    plan = kinds(nodes)
    quotas = shares(total, {k: share for k, (share, _) in plan.items()})
    fuzzer = Fuzzer(nodes)
    first = {name: t.fingerprint() for name, t in nodes.items()}
    changed: dict[str, list[str]] = {k: [] for k in plan}  # kind -> nodes whose model changed during it
    seconds: Counter = Counter()
    sent: Counter = Counter()
    chunk = 0
    while any(sent[k] < quotas[k] for k in plan):  # the kinds take turns, a chunk each
        for kind, (_, strategy) in plan.items():
            n = min(CHUNK, quotas[kind] - sent[kind])
            if n <= 0:
                continue
            start = time.perf_counter()
            got = run_kind(fuzzer, strategy, n, seed=seed + chunk)
            seconds[kind] += time.perf_counter() - start
            sent[kind] += got if got else n  # hypothesis found no more distinct ones: do not loop forever
            chunk += 1
            now = {name: t.fingerprint() for name, t in nodes.items()}
            changed[kind] += [name for name in nodes if now[name] != first[name] and name not in changed[kind]]
            print(f"{kind}: {sent[kind]}/{quotas[kind]} ({seconds[kind]:.0f} s)", file=sys.stderr, flush=True)
    last = {name: t.fingerprint() for name, t in nodes.items()}
    return {
        "quotas": quotas,
        "counts": {k: dict(fuzzer.counts.get(k, Counter())) for k in plan},
        "seconds": dict(seconds),
        "changed": changed,
        "fingerprints": {"before": first, "after": last},
        "aborts": dict(fuzzer.aborts),
        "failures": fuzzer.failures,
    }


def row(kind: str, share: str, c: dict, seconds: float, changed: list[str]) -> list[str]:
    statuses = sorted((k for k in c if k.isdigit()), key=int)
    four = ", ".join(f"{k}: {c[k]}" for k in statuses if k.startswith("4")) or "-"
    five = sum(c[k] for k in statuses if k.startswith("5"))
    two = sum(c[k] for k in statuses if k.startswith("2"))
    return [
        kind,
        share,
        str(c.get("requests", 0)),
        str(two),
        four,
        str(five),
        str(c.get("timeout", 0)),
        str(c.get("reset", 0)),
        str(c.get("closed", 0)),
        str(c.get("failures", 0)),
        ", ".join(changed) if changed else "no",
        f"{c.get('requests', 0) / seconds:.0f}" if seconds else "-",
    ]


def table(result: dict) -> str:
    head = ["kind", "share", "requests", "2xx", "4xx by code", "5xx", "timeouts", "resets", "closed", "failures",
            "model changed", "requests/s"]  # fmt: skip
    quotas = result["quotas"]
    rows = [
        row(k, f"{quotas[k] / sum(quotas.values()):.0%}", c, result["seconds"].get(k, 0.0), result["changed"][k])
        for k, c in result["counts"].items()
    ]
    total: Counter = Counter()
    for c in result["counts"].values():
        total.update(c)
    changed = sorted({n for names in result["changed"].values() for n in names})
    rows.append(["**all**", *row("", "100%", dict(total), sum(result["seconds"].values()), changed)[1:]])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="fuzzed requests in all (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first chunk")
    ap.add_argument("--name", default="fuzz", help="results file name (benchmarks/results/NAME.{md,json})")
    args = ap.parse_args()

    start, load = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gossipfl-fuzz-") as folder, targets(Path(folder)) as nodes:
        result = fuzz(nodes, args.requests, args.seed)
        for t in nodes.values():
            status = t.proc.status()
            result.setdefault("nodes", {})[t.name] = {
                "id": t.node_id,
                "log_problems": len(problems := t.log_problems()),
                "log_problems_first": problems[:20],
                "exchanges": status["exchanges"],
                "refused": status["security"]["refused"],
                "loop_errors": {name: loop["errors"] for name, loop in status["loops"].items()},
                "failure": status["failure"],
            }
    elapsed = time.perf_counter() - start
    machine = (
        f"Python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs; load average "
        f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (requests go one at a time)"
    )
    failures = result.pop("failures")
    total = sum(c.get("requests", 0) for c in result["counts"].values())
    changed = any(result["changed"].values())
    log_problems = sum(n["log_problems"] for n in result["nodes"].values())
    fives = sum(n for c in result["counts"].values() for k, n in c.items() if k.isdigit() and int(k) >= 500)
    verdict = (
        f"{total} requests in {elapsed:.0f} s: {len(failures)} failures, {fives} 5xx, "
        f"model changed: {'YES' if changed else 'no'}, errors or tracebacks in the node logs: {log_problems}; "
        f"prepared and aborted: {result['aborts'].get('aborted', 0)}"
    )
    text = table(result)
    print(text)
    print(verdict)
    logs = "\n".join(
        f"- {name} ({n['id']}): {n['log_problems']} errors, tracebacks or foreign lines in the log; "
        f"exchanges served (committed) {n['exchanges']['served']}, rejected {n['exchanges']['rejected']}; "
        f"refused {n['refused']}"
        for name, n in result["nodes"].items()
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(
        f"# {args.name}\n\n`python benchmarks/fuzz.py {' '.join(sys.argv[1:])}`\n\n{text}\n\n{verdict}.\n\n"
        f"Node logs and counters after the run:\n\n{logs}\n\n"
        "2xx: valid mutated messages prepared (phase 1) and aborted at once by the fuzzer, valid inference "
        "requests, decisions on well-formed unknown ids (answered aborted). Closed: the client ended its side "
        "mid-body and the server closed the connection without an answer (aiohttp takes that as the client "
        f"gone). {machine}.\n"
    )
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps(
            {
                "command": f"python benchmarks/fuzz.py {' '.join(sys.argv[1:])}",
                "args": vars(args),
                "machine": machine,
                "elapsed_s": round(elapsed, 1),
                "requests": total,
                **result,
                "failures_total": len(failures),
                "failures": failures[:MAX_FAILURES_KEPT],
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    sys.exit(1 if failures or changed or log_problems else 0)


if __name__ == "__main__":
    main()
