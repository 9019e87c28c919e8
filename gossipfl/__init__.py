"""gossipfl: peer-to-peer, serverless learning by gossip averaging.

What a user's task or script needs is importable from here::

    from gossipfl import ClassificationTask, InputSpec, TaskData, split     # a task of your own
    from gossipfl import Node, NodeConfig                                   # a node in your program
    from gossipfl import TestbedOptions, run_testbed                        # many nodes on this machine
    from gossipfl import pull, query                                        # a node's model, as a client

Names are loaded on first use, so that ``import gossipfl`` (and ``gossipfl --version``) stays cheap:
torch is imported only by what needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gossipfl.common.lazy import lazy_getattr
from gossipfl.version import __version__

_EXPORTS = {
    # the task plug-in API (learning/task.py, learning/registry.py)
    "Task": "gossipfl.learning.task",
    "ClassificationTask": "gossipfl.learning.task",
    "TaskData": "gossipfl.learning.task",
    "Dataset": "gossipfl.learning.task",
    "InputSpec": "gossipfl.learning.task",
    "OutputSpec": "gossipfl.learning.task",
    "Evaluation": "gossipfl.learning.task",
    "split": "gossipfl.learning.task",
    "Standardize": "gossipfl.learning.normalize",
    "get_task": "gossipfl.learning.registry",
    "TaskError": "gossipfl.learning.registry",
    # a node and its configuration
    "NodeConfig": "gossipfl.config",
    "ConfigError": "gossipfl.config",
    "load_config": "gossipfl.config",
    "Node": "gossipfl.node",
    "StartError": "gossipfl.node",
    # the testbed
    "TestbedOptions": "gossipfl.testbed",
    "run_testbed": "gossipfl.testbed",
    # the client side of serving
    "pull": "gossipfl.serving.client",
    "query": "gossipfl.serving.client",
    "ClientError": "gossipfl.serving.client",
}

__all__ = [
    "ClassificationTask",
    "ClientError",
    "ConfigError",
    "Dataset",
    "Evaluation",
    "InputSpec",
    "Node",
    "NodeConfig",
    "OutputSpec",
    "Standardize",
    "StartError",
    "Task",
    "TaskData",
    "TaskError",
    "TestbedOptions",
    "__version__",
    "get_task",
    "load_config",
    "pull",
    "query",
    "run_testbed",
    "split",
]

if TYPE_CHECKING:
    from gossipfl.config import ConfigError, NodeConfig, load_config
    from gossipfl.learning.normalize import Standardize
    from gossipfl.learning.registry import TaskError, get_task
    from gossipfl.learning.task import (
        ClassificationTask,
        Dataset,
        Evaluation,
        InputSpec,
        OutputSpec,
        Task,
        TaskData,
        split,
    )
    from gossipfl.node import Node, StartError
    from gossipfl.serving.client import ClientError, pull, query
    from gossipfl.testbed import TestbedOptions, run_testbed


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(__all__)
