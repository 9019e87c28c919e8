#!/usr/bin/env python3
"""Chaos testbed: N gossipfl nodes, each on a host of its own (a Linux network namespace) on one bridge,
finding each other over real mDNS multicast, while this script breaks things on a timeline: lossy or
slow links, a partition of the bridge and its heal, SIGKILL and restart of chosen nodes. Every few
seconds it prints a table of the nodes (age, accuracy, peers, exchanges ok/failed), and a summary at
the end. Needs root, ``ip`` and ``tc`` (and ``nft`` for loss on kernels without tc netem); everything it
creates lives in namespaces named gfl-XXXXXX-* and is removed on exit, Ctrl-C included.

    sudo .venv/bin/python scripts/chaos_testbed.py --nodes 8 --duration 90 --loss 10% \\
        --partition-at 20 --heal-at 50 --kill 2 --kill-at 30 --restart-at 45 -- --no-train --gossip-interval 0.5

Times are seconds after every node is up and knows all the others. Options after ``--`` go to every
``gossipfl node`` (each also gets --host/--port/--id/--mdns-interface for its host, --seed I,
--partition I/N and one --cluster for the run).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gossipfl.testbed.netns import NetnsError, Network, missing_requirements, remove  # noqa: E402


def share(text: str) -> float:
    """'10%' or '0.1' -> 0.1"""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(%?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a share such as 10% or 0.1")
    value = float(m.group(1)) / (100 if m.group(2) else 1)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be between 0 and 100%")
    return value


def millis(text: str) -> float:
    """'50ms', '0.05s' or '50' -> 50.0 (milliseconds)"""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 50ms")
    return float(m.group(1)) * (1000 if m.group(2) == "s" else 1)


def hosts_list(text: str) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]"""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    node_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds to run after start-up")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between tables")
    ap.add_argument("--loss", type=share, default=0.0, help="packet loss on the impaired links, each way (10%%)")
    ap.add_argument("--reset", action="store_true", help="answer the 'lost' TCP segments with a reset instead")
    ap.add_argument("--delay", type=millis, default=0.0, help="delay on the impaired links, each way (50ms)")
    ap.add_argument("--jitter", type=millis, default=0.0, help="+- this on the delay")
    ap.add_argument("--impair", type=hosts_list, help="the hosts whose links are impaired (default: all), e.g. 0,2-3")
    ap.add_argument("--impair-at", type=float, default=0.0)
    ap.add_argument("--partition-at", type=float, help="split the hosts into --groups at this time")
    ap.add_argument("--heal-at", type=float, help="join them again at this time")
    ap.add_argument("--groups", help="e.g. '0-3/4-7' (default: two halves)")
    ap.add_argument("--kill", type=int, default=0, help="SIGKILL this many nodes (the last ones) at --kill-at")
    ap.add_argument("--kill-hosts", type=hosts_list, help="or these hosts, e.g. 1,3")
    ap.add_argument("--kill-at", type=float)
    ap.add_argument("--restart-at", type=float, help="start the killed nodes again (same id, address, arguments)")
    ap.add_argument("--logs", type=Path, default=Path("results/chaos"), help="node logs (default: %(default)s)")
    ap.add_argument(
        "--cleanup-stale",
        action="store_true",
        help="remove the namespaces gfl-* (and their processes) a killed run left behind, and exit; "
        "also those of a testbed running now",
    )
    args = ap.parse_args(own)
    if args.heal_at is not None and args.partition_at is None:
        ap.error("--heal-at needs --partition-at")
    if (args.kill or args.kill_hosts) and args.kill_at is None:
        ap.error("--kill needs --kill-at")
    if args.restart_at is not None and args.kill_at is None:
        ap.error("--restart-at needs --kill and --kill-at")
    if args.delay and args.reset:
        ap.error("--delay does not go with --reset")
    return args, node_args


def timeline(args: argparse.Namespace, net: Network) -> list[tuple[float, str, object]]:
    n = len(net.hosts)
    events: list[tuple[float, str, object]] = []
    impaired = args.impair if args.impair is not None else list(range(n))
    if args.loss or args.delay or args.jitter:
        what = f"loss {args.loss:.1%}{' (reset)' if args.reset else ''} delay {args.delay:g}±{args.jitter:g} ms"

        def impair() -> None:
            for i in impaired:
                net.impair(i, delay_ms=args.delay, jitter_ms=args.jitter, loss=args.loss, reset=args.reset)

        events.append((args.impair_at, f"impair hosts {impaired}: {what}", impair))
    if args.partition_at is not None:
        groups = (
            [hosts_list(g) for g in args.groups.split("/")]
            if args.groups
            else [list(range(n // 2)), list(range(n // 2, n))]
        )
        events.append((args.partition_at, f"partition {groups}", lambda: net.partition(groups)))
        if args.heal_at is not None:
            events.append((args.heal_at, "heal", net.heal))
    victims = args.kill_hosts or list(range(n - args.kill, n))
    if args.kill_at is not None and victims:
        events.append((args.kill_at, f"SIGKILL hosts {victims}", lambda: [net.kill(i) for i in victims]))
        if args.restart_at is not None:
            events.append((args.restart_at, f"restart hosts {victims}", lambda: [net.restart(i) for i in victims]))
    return sorted(events, key=lambda e: e[0])


def table(net: Network, t: float) -> tuple[str, list]:
    sts = net.statuses()
    lines = [
        f"t={t:6.1f}s",
        f"{'node':<6} {'bridge':<6} {'up':<4} {'age':>6} {'accuracy':>8} {'peers':>9} {'ok':>6} {'failed':>6} "
        f"{'busy':>5} {'aborted':>7} {'starts':>6}",
    ]
    for h, st in zip(net.hosts, sts, strict=True):
        up = "yes" if st is not None else ("..." if net.running(h.index) else "down")
        bridge = net.bridge_of(h.index)
        if st is None:
            lines.append(f"{h.node_id:<6} {bridge:<6} {up:<4}")
            continue
        ex, acc = st["exchanges"], st["metrics"].get("accuracy")
        peers = f"{sum(1 for p in st['peers'] if p.get('alive'))}/{len(st['peers'])}"  # not failing / known
        accuracy = "-" if acc is None else f"{acc:.4f}"
        lines.append(
            f"{h.node_id:<6} {bridge:<6} {up:<4} {st['age']:>6} {accuracy:>8} {peers:>9} {ex['ok']:>6} "
            f"{ex['failed']:>6} {ex['busy']:>5} {ex['aborted']:>7} {h.starts:>6}"
        )
    return "\n".join(lines), sts


def run(args: argparse.Namespace, node_args: list[str]) -> int:
    with Network(args.nodes, args.logs) as net:
        tag = net.prefix.strip("-")
        if (args.delay or args.jitter) and not net.netem:
            raise NetnsError("--delay needs tc netem, which this kernel lacks (CONFIG_NET_SCH_NETEM); --loss works")
        print(
            f"chaos: {args.nodes} hosts in namespaces {net.prefix}*, tc netem: {'yes' if net.netem else 'no'}; "
            f"node logs in {args.logs}/",
            flush=True,
        )
        for i in range(args.nodes):
            net.start(
                i, ["--cluster", f"chaos-{tag}", "--seed", str(i), "--partition", f"{i}/{args.nodes}", *node_args]
            )
        t_launch = time.monotonic()
        net.wait_ready(timeout=60 + 5 * args.nodes)
        print(f"chaos: all up and know each other after {time.monotonic() - t_launch:.1f} s", flush=True)
        events, done = timeline(args, net), []
        t0, next_table, unexpected = time.monotonic(), 0.0, []
        while (t := time.monotonic() - t0) < args.duration:
            while events and events[0][0] <= t:
                at, label, action = events.pop(0)
                action()  # type: ignore[operator]
                done.append((time.monotonic() - t0, label))
                print(f"chaos: t={done[-1][0]:.1f}s {label}", flush=True)
            for h in net.hosts:
                p = h.proc
                if p is not None and p.poll() is not None and not h.killed and h.node_id not in unexpected:
                    unexpected.append(h.node_id)
                    print(f"chaos: {h.node_id} exited by itself with code {p.returncode}", flush=True)
            if t >= next_table:
                print(table(net, t)[0] + "\n", flush=True)
                next_table += args.every
            time.sleep(min(0.2, max(0.0, args.duration - t)))
        text, sts = table(net, time.monotonic() - t0)
        codes = net.stop_all()
    ok = sum(s["exchanges"]["ok"] for s in sts if s)
    failed = sum(s["exchanges"]["failed"] for s in sts if s)
    print("chaos: summary\n" + text)
    print("events: " + "; ".join(f"{t:.1f}s {label}" for t, label in done))
    print(f"exchanges started: {ok} ok, {failed} failed; exit codes after SIGTERM: {codes}")
    if unexpected:
        print(f"chaos: nodes that exited by themselves: {unexpected}")
    killed = {h.node_id for h in net.hosts if h.killed}  # killed on purpose and not restarted: -9 is expected
    return 1 if unexpected or any(c not in (0, None) for n, c in codes.items() if n not in killed) else 0


def main() -> int:
    args, node_args = parse(sys.argv[1:])
    if why := missing_requirements():
        print(f"chaos_testbed: {why}", file=sys.stderr)
        return 2
    if args.cleanup_stale:
        print(f"removed: {remove('gfl-') or 'nothing'}")
        return 0
    # SIGTERM and SIGHUP end the run like Ctrl-C: the network's context manager removes what it made
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        return run(args, node_args)
    except NetnsError as e:
        print(f"chaos_testbed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chaos_testbed: interrupted; namespaces removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
