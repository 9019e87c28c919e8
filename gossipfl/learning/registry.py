"""Names of the built-in tasks."""

from __future__ import annotations

from .digits import DigitsTask
from .task import Task

BUILTIN_TASKS = {"digits": DigitsTask}


def get_task(name: str) -> Task:
    try:
        return BUILTIN_TASKS[name]()
    except KeyError:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise ValueError(f"unknown task {name!r} (built-in: {known})") from None
