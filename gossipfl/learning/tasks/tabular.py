"""Built-in task ``tabular``: an MLP on the node's own data file (``--data PATH``, .npz or .csv).

- ``.npz``: arrays ``x`` (samples x features, numeric) and ``y`` (integer class ids); read without
  pickle.
- ``.csv``: numeric columns, the last one the class id; a first line that is not numeric is a header.

Class ids must be integers 0..C-1. C is read from the file unless ``--task tabular:classes=C`` fixes
it, which a cluster should do: a node whose file lacks a class would otherwise build a smaller model,
and peers with another model shape are not gossiped with. The node's test split is a seeded 20% of
its own file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from gossipfl.learning.normalize import Standardize
from gossipfl.learning.task import ClassificationTask, InputSpec, TaskData, split


def read_table(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load (x, y) from .npz or .csv; raise ValueError naming the file and the problem."""
    path = Path(path)
    where = f"data {path}"
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("x", "y") if k not in f.files]
                if missing:
                    raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (has: {', '.join(f.files) or '-'})")
                x, y = f["x"], f["y"]
        elif path.suffix == ".csv":
            first = path.open().readline()
            header = not all(_is_number(c) for c in first.strip().split(","))
            table = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2)
            x, y = table[:, :-1], table[:, -1]
        else:
            raise ValueError(f"{where}: expected a .npz or .csv file")
    except OSError as e:
        raise ValueError(f"{where}: {e.strerror or e}") from None
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {e}") from None
    if x.ndim != 2 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{where}: x must be a numeric 2-D array (samples x features), got shape {x.shape}")
    if y.ndim != 1:
        raise ValueError(f"{where}: y must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.mod(y, 1) == 0) or (len(y) and y.min() < 0):
        raise ValueError(f"{where}: labels must be integer class ids 0..C-1")
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: x contains NaN or Inf")
    return x.astype(np.float32), y.astype(np.int64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class TabularTask(ClassificationTask):
    name = "tabular"

    def __init__(self, data: str | None = None, classes: int | None = None, hidden: int = 64) -> None:
        if data is None:
            raise ValueError("task tabular needs --data PATH (.npz with x and y, or .csv)")
        self.path = data
        self.x, self.y = read_table(data)
        found = int(self.y.max()) + 1 if len(self.y) else 0
        self.classes = classes if classes is not None else found
        if self.classes < 2 or found > self.classes:
            raise ValueError(
                f"data {data}: labels need C >= 2 classes and ids below C; "
                f"found ids up to {found - 1} with C={self.classes}"
            )
        if len(self.y) < 10:
            raise ValueError(f"data {data}: {len(self.y)} samples are too few (at least 10)")
        self.hidden = hidden
        self.input_spec = InputSpec((self.x.shape[1],), "float32")

    def load_data(self, data_seed: int) -> TaskData:
        train, test = split(self.x, self.y, data_seed)
        return TaskData(train, test, num_classes=self.classes)

    def build_model(self) -> nn.Module:
        d = self.x.shape[1]
        # columns are standardised inside the model, with statistics the network averages (normalize.py)
        return nn.Sequential(Standardize(d), nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.classes))
