"""The node's command-line options, one flag per ``NodeConfig`` field, parsed the same way for ``gossipfl
node`` and for the nodes an in-process testbed runs."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from gossipfl.config import ConfigError, NodeConfig, load_config, option_fields


def add_node_options(p: argparse.ArgumentParser) -> None:
    """One flag per NodeConfig field; defaults are suppressed so only given flags reach load_config."""
    p.add_argument("--config", metavar="FILE", help="TOML file with node options (env: GOSSIPFL_CONFIG)")
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (env GOSSIPFL_{f.name.upper()}; default {f.default!r})"
        if str(f.type) == "bool":
            p.add_argument(flag, action="store_const", const=True, default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


class _NodeOptionsParser(argparse.ArgumentParser):
    """Parses ``gossipfl node`` options given as a list (the testbed's ``-- NODE OPTIONS`` in inproc
    mode): an error raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"node options: {message}")


def node_config_from_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> NodeConfig:
    """The NodeConfig that ``gossipfl node ARGV`` would run with, from the same flags and the same merge
    (``--config FILE`` and the ``GOSSIPFL_*`` environment included, as for a node process)."""
    parser = _NodeOptionsParser(prog="gossipfl node", add_help=False)
    add_node_options(parser)
    return config_from_namespace(parser.parse_args(list(argv)), env)


def config_from_namespace(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Merge the node flags that were given (defaults are suppressed) with env, config file and defaults."""
    cli: dict[str, Any] = {f.name: getattr(args, f.name) for f in option_fields() if hasattr(args, f.name)}
    return load_config(cli, env=env, config_file=args.config)
