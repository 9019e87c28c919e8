"""Command line: ``gossipfl node``, ``testbed``, ``dashboard``, ``peers``, ``pull``, ``query`` and ``certs``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gossipfl.args import add_node_options, config_from_namespace
from gossipfl.common.logs import fatal
from gossipfl.config import GOSSIP_INTERVAL_S, ConfigError, NodeConfig
from gossipfl.version import __version__

if TYPE_CHECKING:
    from gossipfl.learning.task import Task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossipfl", description="Peer-to-peer, serverless learning.")
    parser.add_argument("--version", action="version", version=f"gossipfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one node until SIGINT/SIGTERM")
    add_node_options(node)

    tb = sub.add_parser("testbed", help="launch N nodes on 127.0.0.1 (mDNS on loopback) and watch them")
    tb.add_argument("--nodes", type=int, default=8)
    tb.add_argument("--duration", type=float, default=60.0, help="seconds, counted once all nodes are up")
    tb.add_argument("--out", default="results/testbed", help="folder for results.json and node logs")
    tb.add_argument("--no-train", action="store_true", help="pure averaging")
    tb.add_argument("--gossip-interval", type=float, default=GOSSIP_INTERVAL_S, help="the nodes' --gossip-interval")
    tb.add_argument("--sample-interval", type=float, default=1.0, help="seconds between measurements")
    tb.add_argument("--task", default="digits")
    tb.add_argument(
        "--data", default=None, help="data file every node reads (--task tabular or your own); each keeps its shard"
    )
    tb.add_argument("--seed", type=int, default=0, help="node i gets seed SEED+i")
    tb.add_argument("--quiet", action="store_true", help="no live table")
    tb.add_argument(
        "--mode",
        choices=("process", "inproc"),
        default="process",
        help="process: one process per node (default); inproc: all nodes in this process, one event loop",
    )
    tb.add_argument(
        "--no-fork",
        action="store_true",
        help="process: start every node in a fresh interpreter (by default nodes are forked from one process "
        "that imported torch once, which starts them several seconds sooner)",
    )
    tb.add_argument(
        "--inproc-workers",
        type=int,
        default=0,
        metavar="W",
        help="inproc: worker threads for the nodes' blocking work (default: CPU cores + 2, at most N + 4)",
    )
    tb.add_argument(
        "--dashboard-port",
        type=int,
        metavar="P",
        help="serve the network view (as gossipfl dashboard) on 127.0.0.1:P during the run; 0: a free port",
    )
    tb.add_argument(
        "node_args", nargs=argparse.REMAINDER, help="after '--': extra options passed to every node, e.g. -- --lr 0.002"
    )

    token_help = "the node's read token (env GOSSIPFL_TOKEN, which ps does not show); needed with --read-token"
    cacert_help = "for an https node (mutual TLS): the cluster CA certificate to check it against"
    peers = sub.add_parser("peers", help="list the gossipfl nodes visible over mDNS, or those a node knows (--url)")
    peers.add_argument("--mdns-interface", default="", help="IPv4 address(es), comma-separated (default: all)")
    peers.add_argument("--url", help="instead of listening to mDNS, list the peers this node knows (GET /v1/peers)")
    peers.add_argument("--token", help=token_help)
    peers.add_argument("--cacert", metavar="FILE", help=cacert_help)
    peers.add_argument("--timeout", type=float, default=3.0, help="seconds to listen")
    peers.add_argument("--json", action="store_true")

    dash = sub.add_parser("dashboard", help="serve a web page watching many nodes (the network view)")
    dash.add_argument("--seeds", default="", metavar="URL,URL", help="the nodes to watch (default: those on mDNS)")
    dash.add_argument("--host", default="127.0.0.1", help="address to serve the page on (it shows what --token reads)")
    dash.add_argument("--port", type=int, default=8480, help="0: any free port")
    dash.add_argument("--interval", type=float, default=2.0, help="seconds between reads of every node")
    dash.add_argument("--no-models", action="store_true", help="do not fetch models (no consensus distance)")
    dash.add_argument("--mdns-interface", default="", help="IPv4 address(es), comma-separated (default: all)")
    dash.add_argument("--cluster", help="without --seeds: only the nodes of this cluster")
    dash.add_argument("--token", help=token_help)
    dash.add_argument("--cacert", metavar="FILE", help=cacert_help)

    pull = sub.add_parser("pull", help="save a node's served model as a safetensors file")
    pull.add_argument("url", help="the node, e.g. http://127.0.0.1:8470")
    pull.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the .safetensors file")
    pull.add_argument("--token", help=token_help)
    pull.add_argument("--cacert", metavar="FILE", help=cacert_help)

    query = sub.add_parser("query", help="run inputs through a node's model (Open Inference Protocol v2)")
    query.add_argument("url", help="the node, e.g. http://127.0.0.1:8470")
    query.add_argument("--input", required=True, metavar="FILE", help=".npy or .json: rows of raw features")
    query.add_argument("--model", help="model name (default: the node's task)")
    query.add_argument("--json", action="store_true", help="print all outputs as JSON")
    query.add_argument("--token", help=token_help)
    query.add_argument("--cacert", metavar="FILE", help=cacert_help)

    certs = sub.add_parser("certs", help="a cluster CA and node certificates for mutual TLS")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="create a cluster CA: DIR/ca.crt and DIR/ca.key")
    init.add_argument("dir")
    issue = certs_sub.add_parser("issue", help="issue DIR/NODE_ID.crt and DIR/NODE_ID.key, signed by the CA in DIR")
    issue.add_argument("dir")
    issue.add_argument("node_id")
    return parser


def _log_format(args: argparse.Namespace) -> str:
    """The log format a command asked for, as far as it can be known when its configuration failed to load
    (the flag, else the environment; a config file's is not read)."""
    fmt = getattr(args, "log_format", None) or os.environ.get("GOSSIPFL_LOG_FORMAT", "text")
    return "json" if fmt == "json" else "text"


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("GOSSIPFL_TOKEN") or None


async def _run_node(config: NodeConfig, task: Task) -> int:
    from gossipfl.node import Node, StartError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config, task=task)
    starting = asyncio.ensure_future(node.start())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, signalled], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # SIGTERM while starting (loading data, waiting for a DNS record): stop cleanly
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)  # start() releases what it acquired
        logging.getLogger("gossipfl").info("signal received during start-up: node stopped before it started")
        return 0
    signalled.cancel()
    try:
        starting.result()
    except StartError as e:
        fatal(str(e), config.log_format)
        return 2
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(node.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if stop.is_set():
        node.log.info("signal received, stopping")
    await node.stop()
    if node.exit_code:
        fatal(str(node.failure), config.log_format)
    return node.exit_code


def raise_fd_limit() -> None:
    """Raise this process's open-file limit to its hard limit: every connection is a file descriptor,
    and a soft limit of 1024 is easy to exhaust with slow clients."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 16, hard))
        except (ValueError, OSError):
            pass


def cmd_node(args: argparse.Namespace) -> int:
    from gossipfl.common.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread allocates: see common/memory.py
    config = config_from_namespace(args)
    from gossipfl.common.logs import setup_logging
    from gossipfl.learning.registry import get_task

    try:
        task = get_task(config.task, config.data)  # fail early, before anything starts
    except ValueError as e:
        raise ConfigError(str(e)) from None
    setup_logging(config.log_format, config.log_level)
    import torch

    torch.set_num_threads(config.torch_threads)
    raise_fd_limit()
    return asyncio.run(_run_node(config, task))


def cmd_testbed(args: argparse.Namespace) -> int:
    from gossipfl.common.logs import setup_logging
    from gossipfl.testbed import TestbedOptions, run_testbed

    setup_logging("text", "info")
    extra = list(args.node_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    from gossipfl.learning.registry import get_task

    if "--data" in extra or any(a.startswith("--data=") for a in extra):
        raise ConfigError("give --data to the testbed, before --: it reads the file too (the model's shape)")
    try:
        get_task(args.task, args.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.nodes < 1:
        raise ConfigError("--nodes must be >= 1")
    if args.duration <= 0:
        raise ConfigError("--duration must be > 0")
    if args.inproc_workers < 0:
        raise ConfigError("--inproc-workers must be >= 0")
    if args.dashboard_port is not None and not 0 <= args.dashboard_port <= 65535:
        raise ConfigError("--dashboard-port must be from 0 to 65535")
    opts = TestbedOptions(
        nodes=args.nodes,
        duration=args.duration,
        out=args.out,
        no_train=args.no_train,
        gossip_interval=args.gossip_interval,
        sample_interval=args.sample_interval,
        task=args.task,
        data=args.data and str(Path(args.data).resolve()),
        seed=args.seed,
        live=not args.quiet,
        extra_node_args=tuple(extra),
        mode=args.mode,
        inproc_workers=args.inproc_workers,
        fork=not args.no_fork,
        dashboard_port=args.dashboard_port,
    )
    return asyncio.run(run_testbed(opts))


def cmd_peers(args: argparse.Namespace) -> int:
    import json

    from gossipfl.discovery.mdns import browse

    if args.url:
        from gossipfl.serving.client import base_url, get_json

        doc = get_json(base_url(args.url) + "/v1/peers", args.timeout, _token(args), args.cacert)
        rows = doc.get("peers") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise ConfigError(f"{args.url}: not a gossipfl peer list")
        found = [{"cluster": "", "proto": "", **r} for r in rows if isinstance(r, dict)]
    else:
        interfaces = [i.strip() for i in args.mdns_interface.split(",") if i.strip()]
        found = asyncio.run(browse(interfaces, args.timeout))
    if args.json:
        print(json.dumps(found, indent=2))
    elif not found:
        print(f"no peers known to {args.url}" if args.url else f"no gossipfl nodes found in {args.timeout:g} s")
    else:
        print(f"{'id':<24} {'url':<28} {'task':<12} {'cluster':<16} proto")
        for p in found:
            print(
                f"{p.get('id')!s:<24} {p.get('url') or '-':<28} {p.get('task') or '-':<12} "
                f"{p.get('cluster') or '-':<16} {p.get('proto') or '-'}"
            )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from gossipfl.common.logs import setup_logging
    from gossipfl.discovery.service import DiscoveryError
    from gossipfl.monitor.collector import Collector
    from gossipfl.monitor.run import serve_dashboard

    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port must be from 0 to 65535")
    if not 0 < args.interval < float("inf"):  # (nan: a busy loop; inf: one read, then none)
        raise ConfigError("--interval must be a number of seconds > 0")
    try:
        collector = Collector(seeds, interval=args.interval, token=_token(args), cacert=args.cacert,
                              models=not args.no_models)  # fmt: skip
    except (ValueError, OSError) as e:  # a bad URL or interval, an unreadable --cacert
        raise ConfigError(str(e)) from None
    setup_logging("text", "info")
    interfaces = [i.strip() for i in args.mdns_interface.split(",") if i.strip()]
    try:
        asyncio.run(serve_dashboard(collector, host=args.host, port=args.port, mdns=not seeds,
                                    mdns_interfaces=interfaces, cluster=args.cluster))  # fmt: skip
    except DiscoveryError as e:  # ("mDNS on ADDRESS: ...")
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from gossipfl.serving.client import pull

    info = pull(args.url, args.output, token=_token(args), cacert=args.cacert)
    meta = info["metadata"]
    print(
        f"saved {info['file']} ({info['bytes']:,} bytes, {len(info['tensors'])} tensors): "
        f"task={meta.get('task')} node={meta.get('node_id')} age={meta.get('age')}"
    )
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import json

    from gossipfl.serving.client import load_input, query

    out = query(args.url, load_input(args.input), model=args.model, token=_token(args), cacert=args.cacert)
    if args.json or "label" not in out:
        print(json.dumps({k: v.tolist() for k, v in out.items()}))
        return 0
    probs = out.get("probabilities")
    print("row  label  probability")
    for i, label in enumerate(out["label"]):
        p = "-" if probs is None else f"{probs[i][label]:.4f}"
        print(f"{i:>3}  {label:>5}  {p:>11}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from gossipfl.security import certs

    if args.certs_command == "init":
        ca = certs.init_ca(args.dir)
        print(f"cluster CA: {ca} (its key {Path(args.dir) / 'ca.key'} signs node certificates: keep it off the nodes)")
    else:
        cert, key = certs.issue(args.dir, args.node_id)
        print(
            f"node {args.node_id}: {cert} and {key}; run it with --tls-cert {cert} --tls-key {key} "
            f"--tls-ca {Path(args.dir) / 'ca.crt'}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from gossipfl.security.secrets import SecretError
    from gossipfl.serving.client import ClientError

    args = build_parser().parse_args(argv)
    commands = {
        "node": cmd_node,
        "testbed": cmd_testbed,
        "dashboard": cmd_dashboard,
        "peers": cmd_peers,
        "pull": cmd_pull,
        "query": cmd_query,
        "certs": cmd_certs,
    }
    try:
        return commands[args.command](args)
    except (ConfigError, SecretError) as e:
        fatal(str(e), _log_format(args))
        return 2
    except ClientError as e:
        fatal(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
