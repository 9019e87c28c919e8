"""Finding a task by its ``--task`` spec.

- a built-in name, optionally with options: ``digits``, ``digits-cnn``, ``synthetic:dim=512,classes=4``,
  ``tabular:classes=10`` (with ``--data PATH``);
- ``package.module:factory``: a user's task; ``factory()`` (or ``factory(data=PATH)`` with ``--data``)
  must return an object with the members described in ``gossipfl.learning.task``.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable

from torch import nn

from gossipfl.learning.task import Dataset, InputSpec, Task, TaskData
from gossipfl.learning.tasks.digits import DigitsCnnTask, DigitsTask
from gossipfl.learning.tasks.synthetic import SyntheticTask
from gossipfl.learning.tasks.tabular import TabularTask

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "digits": DigitsTask,
    "digits-cnn": DigitsCnnTask,
    "synthetic": SyntheticTask,
    "tabular": TabularTask,
}


class TaskError(ValueError):
    """The task spec, the task object or what it returns is wrong; the message names the problem."""


def _options(spec: str, text: str) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise TaskError(f"task {spec!r}: option {item!r} must be KEY=NUMBER") from None
        if not sep or not key.strip():
            raise TaskError(f"task {spec!r}: option {item!r} must be KEY=NUMBER")
    return out


def _call(factory: Callable[..., object], spec: str, kwargs: dict) -> object:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    unknown = [k for k in kwargs if params and k not in params and not _takes_kwargs(params)]
    if unknown:
        raise TaskError(f"task {spec!r}: unknown option(s) {', '.join(unknown)}")
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise TaskError(f"task {spec!r}: {e}") from None


def _takes_kwargs(params: object) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # type: ignore[attr-defined]


def get_task(spec: str, data: str | None = None) -> Task:
    """Build the task named by ``spec``; raise TaskError with a one-line message if that fails."""
    name, _, rest = spec.partition(":")
    if name in BUILTIN_TASKS:
        kwargs: dict[str, object] = dict(_options(spec, rest))
        if name == "tabular":
            kwargs["data"] = data
        elif data is not None:
            raise TaskError(f"--data is for --task tabular or a task of your own, not {name!r}")
        task = _call(BUILTIN_TASKS[name], spec, kwargs)
    elif rest.isidentifier():
        task = _call(_import_factory(spec, name, rest), spec, {"data": data} if data is not None else {})
    else:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskError(f"unknown task {spec!r} (built-in: {known}; or package.module:factory)")
    check_task(task, spec)
    return task  # type: ignore[return-value]


def _import_factory(spec: str, module_name: str, attr: str) -> Callable[..., object]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"task {spec!r}: cannot import {module_name!r}: {e}") from None
    except Exception as e:  # the user's module raised while importing
        raise TaskError(f"task {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TaskError(f"task {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


def check_task(task: object, spec: str) -> None:
    """The object has the members of a Task, with the right types where they can be checked cheaply."""
    missing = [
        m for m in ("name", "input_spec", "load_data", "build_model", "train_step", "evaluate") if not hasattr(task, m)
    ]
    if missing:
        raise TaskError(f"task {spec!r}: the factory returned {type(task).__name__}, which lacks {', '.join(missing)}")
    if not isinstance(task.name, str) or not task.name or len(task.name.encode()) > 200:  # type: ignore[attr-defined]
        raise TaskError(f"task {spec!r}: name must be a non-empty string of at most 200 bytes")
    if not isinstance(task.input_spec, InputSpec):  # type: ignore[attr-defined]
        raise TaskError(f"task {spec!r}: input_spec must be a gossipfl.learning.task.InputSpec")


# Tasks import their libraries lazily, in load_data, and nodes sharing a process load their data in
# worker threads at the same time. Python's import system is not safe for two threads importing one
# package whose modules import each other (scikit-learn raised "partially initialized module"), so
# data loading is serialized per process. A lock, not state: there is one import system per process.
_LOAD_LOCK = threading.Lock()


def load_checked(task: Task, data_seed: int) -> TaskData:
    """``task.load_data`` with its result checked, so a broken plug-in fails at start with one line.
    One call at a time per process (see ``_LOAD_LOCK``)."""
    try:
        with _LOAD_LOCK:
            data = task.load_data(data_seed)
    except (OSError, ValueError) as e:
        raise TaskError(f"task {task.name!r}: load_data failed: {e}") from None
    if not isinstance(data, TaskData) or not isinstance(data.train, Dataset) or not isinstance(data.test, Dataset):
        raise TaskError(f"task {task.name!r}: load_data returned {type(data).__name__}, expected TaskData")
    if len(data.train) == 0 or len(data.test) == 0:
        raise TaskError(f"task {task.name!r}: load_data returned an empty train or test split")
    if tuple(data.train.x.shape[1:]) != task.input_spec.shape:
        raise TaskError(
            f"task {task.name!r}: inputs have shape {list(data.train.x.shape[1:])}, "
            f"input_spec says {list(task.input_spec.shape)}"
        )
    return data


def build_checked(task: Task) -> nn.Module:
    model = task.build_model()
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: build_model returned {type(model).__name__}, expected torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise TaskError(f"task {task.name!r}: build_model returned a model without parameters")
    return model
