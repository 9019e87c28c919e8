"""The task plug-in API: built-ins, user factories, data files, and every way they can be wrong."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossipfl.learning.learner import Learner, build_seeded
from gossipfl.learning.registry import TaskError, build_checked, get_task, load_checked

from .helpers import running, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def trained_accuracy(task, steps=300):
    data = load_checked(task, 2026)
    model = build_seeded(lambda: build_checked(task), 0)
    learner = Learner(task, model, data.train, data.test, seed=0, lr=3e-3)
    before = learner.evaluate().accuracy
    learner.train_steps(steps)
    return before, learner.evaluate().accuracy


@pytest.mark.parametrize(("spec", "floor"), [("digits", 0.9), ("digits-cnn", 0.9), ("synthetic", 0.8)])
def test_builtin_tasks_learn(spec, floor):
    task = get_task(spec)
    data = load_checked(task, 2026)
    assert tuple(data.train.x.shape[1:]) == task.input_spec.shape
    assert data.train.x.dtype == np.dtype(task.input_spec.dtype)
    before, after = trained_accuracy(task)
    assert after >= floor and after > before


def test_synthetic_takes_size_options_and_is_deterministic():
    task = get_task("synthetic:dim=300,classes=4,samples=1000")
    a, b = task.load_data(5), task.load_data(5)
    assert a.train.x.shape == (800, 300) and a.num_classes == 4 and set(np.unique(a.train.y)) == {0, 1, 2, 3}
    assert np.array_equal(a.train.x, b.train.x) and not np.array_equal(task.load_data(6).train.x, a.train.x)
    assert isinstance(build_checked(task), torch.nn.Linear)


@pytest.mark.parametrize("mb", [0.1, 1, 10, 100, 400])
def test_synthetic_mb_builds_a_model_of_that_size_with_small_data(mb):
    task = get_task(f"synthetic:mb={mb}")
    with torch.device("meta"):  # shapes only: 400 MB is not allocated
        model = task.build_model()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(size / (mb * 2**20) - 1) < 0.01
    assert max(p.numel() for p in model.parameters()) * 4 <= 16 * 2**20  # no tensor beyond a 2048-wide layer
    assert task.load_data(0).train.x.shape == (1600, 20)


def test_synthetic_mb_trains():
    before, after = trained_accuracy(get_task("synthetic:mb=0.2"))
    assert after > before and after >= 0.7


def test_the_example_plugin_works(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    task = get_task("iris_task:make_task")
    assert task.name == "iris" and task.input_spec.shape == (4,)
    _, after = trained_accuracy(task, steps=400)
    assert after >= 0.85


def write_module(tmp_path, monkeypatch, body):
    (tmp_path / "user_task_mod.py").write_text(
        "from gossipfl.learning.task import ClassificationTask, InputSpec, TaskData, Dataset\n"
        "import numpy as np\nfrom torch import nn\n" + body
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_task_mod", None)


@pytest.mark.parametrize(
    ("body", "spec", "fragment"),
    [
        ("", "no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("", "user_task_mod:missing", "has no callable 'missing'"),
        ("raise RuntimeError('boom')\n", "user_task_mod:make", "raised RuntimeError: boom"),
        ("def make():\n    return 42\n", "user_task_mod:make", "returned int, which lacks name, input_spec"),
        (
            "class T(ClassificationTask):\n    name = ''\ndef make():\n    return T()\n",
            "user_task_mod:make",
            "name must be a non-empty string",
        ),
        (
            "class T(ClassificationTask):\n    name = 't'\n    input_spec = (3,)\ndef make():\n    return T()\n",
            "user_task_mod:make",
            "input_spec must be",
        ),
        ("def make(size):\n    return None\n", "user_task_mod:make", "missing 1 required positional argument"),
    ],
)
def test_broken_user_tasks_fail_with_one_line(tmp_path, monkeypatch, body, spec, fragment):
    write_module(tmp_path, monkeypatch, body)
    with pytest.raises(TaskError, match=fragment):
        get_task(spec)


BAD_OUTPUTS = """
class T(ClassificationTask):
    name = "t"
    input_spec = InputSpec((3,), "float32")
    def __init__(self, data_result="ok", model="ok"):
        self.data_result, self.model = data_result, model
    def load_data(self, data_seed):
        if self.data_result == "wrong":
            return {"x": 1}
        x = np.zeros((20, 4 if self.data_result == "shape" else 3), np.float32)
        return TaskData(Dataset(x, np.zeros(20, np.int64)), Dataset(x, np.zeros(20, np.int64)), 2)
    def build_model(self):
        return "not a model" if self.model == "wrong" else (nn.ReLU() if self.model == "empty" else nn.Linear(3, 2))
"""


def test_wrong_task_outputs_are_named(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, BAD_OUTPUTS)
    import user_task_mod

    with pytest.raises(TaskError, match="load_data returned dict, expected TaskData"):
        load_checked(user_task_mod.T(data_result="wrong"), 0)
    with pytest.raises(TaskError, match=r"inputs have shape \[4\], input_spec says \[3\]"):
        load_checked(user_task_mod.T(data_result="shape"), 0)
    with pytest.raises(TaskError, match="build_model returned str, expected torch.nn.Module"):
        build_checked(user_task_mod.T(model="wrong"))
    with pytest.raises(TaskError, match="without parameters"):
        build_checked(user_task_mod.T(model="empty"))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mnist", "unknown task 'mnist'"),
        ("synthetic:dim=abc", "option 'dim=abc' must be KEY=NUMBER"),
        ("synthetic:dim", "option 'dim' must be KEY=NUMBER"),
        ("synthetic:colour=1", "unknown option"),
        ("synthetic:classes=1", "classes >= 2"),
        ("synthetic:mb=-1", "0 <= mb <= 65536"),
        ("tabular", "task tabular needs --data PATH"),
    ],
)
def test_bad_task_specs(spec, fragment):
    with pytest.raises(TaskError, match=fragment):
        get_task(spec)


def test_data_is_only_for_tasks_that_read_it(tmp_path):
    with pytest.raises(TaskError, match="--data is for --task tabular"):
        get_task("digits", data=str(tmp_path / "x.npz"))


# -- data files -----------------------------------------------------------------------------------
def blobs(n=120, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d)) + 3 * np.eye(classes, d)[y]
    return x, y


def test_npz_and_csv_data_train(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savetxt(tmp_path / "d.csv", np.column_stack([x, y]), delimiter=",", header="a,b,c,d,e,label", comments="")
    for name in ("d.npz", "d.csv"):
        task = get_task("tabular", data=str(tmp_path / name))
        assert task.input_spec.shape == (5,) and task.classes == 3
        _, after = trained_accuracy(task)
        assert after >= 0.9


@pytest.mark.parametrize(
    ("make", "spec", "fragment"),
    [
        (lambda p, x, y: np.savez(p, x=x), "tabular", r"missing key\(s\) y \(has: x\)"),
        (lambda p, x, y: np.savez(p, x=x, y=y[:-1]), "tabular", "120 inputs but 119 labels"),
        (lambda p, x, y: np.savez(p, x=x, y=y + 0.5), "tabular", "labels must be integer class ids"),
        (lambda p, x, y: np.savez(p, x=x, y=-y), "tabular", "labels must be integer class ids"),
        (lambda p, x, y: np.savez(p, x=x, y=y), "tabular:classes=2", "found ids up to 2 with C=2"),
        (lambda p, x, y: np.savez(p, x=x, y=np.zeros_like(y)), "tabular", "C >= 2 classes"),
        (lambda p, x, y: np.savez(p, x=x[:, 0], y=y), "tabular", "x must be a numeric 2-D array"),
        (lambda p, x, y: np.savez(p, x=np.where(x > 2, np.nan, x), y=y), "tabular", "NaN or Inf"),
        (lambda p, x, y: np.savez(p, x=np.array([object()] * 120), y=y), "tabular", "allow_pickle=False"),
        (lambda p, x, y: p.write_bytes(b"not a zip"), "tabular", "data .*d.npz"),
    ],
)
def test_bad_data_files_are_named(tmp_path, make, spec, fragment):
    x, y = blobs()
    make(tmp_path / "d.npz", x, y)
    with pytest.raises(TaskError, match=fragment):
        get_task(spec, data=str(tmp_path / "d.npz"))


def test_missing_or_unsupported_data_file(tmp_path):
    with pytest.raises(TaskError, match="No such file"):
        get_task("tabular", data=str(tmp_path / "none.npz"))
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(TaskError, match="expected a .npz or .csv file"):
        get_task("tabular", data=str(tmp_path / "d.parquet"))


# -- through the node and the command line -----------------------------------------------------------
async def test_nodes_run_other_tasks(make_config, tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    configs = [
        make_config(task="digits-cnn"),
        make_config(task="tabular:classes=3", data=str(tmp_path / "d.npz")),
        make_config(task="synthetic:dim=50"),
    ]
    async with running(*configs) as nodes:
        # each really trains and is scored after training (not just the evaluation made at start)
        assert await wait_for(lambda: all(n.learner.steps >= 60 for n in nodes), timeout=30)  # > publish_after_steps
        evals = [n.supervisor.loops["eval"].rounds for n in nodes]
        assert await wait_for(
            lambda: all(n.supervisor.loops["eval"].rounds > e for n, e in zip(nodes, evals, strict=True)), 10
        )
        statuses = [n.status() for n in nodes]
    assert [s["task"] for s in statuses] == ["digits-cnn", "tabular", "synthetic"]
    assert statuses[1]["samples"] == 96 and len(statuses[1]["class_histogram"]) == 3
    for s in statuses:
        assert s["training"] and s["served"]["age"] > 0 and s["metrics"]["loss"] is not None
        assert all(loop["errors"] == 0 for loop in s["loops"].values()), s["loops"]


async def test_eval_split_validation_scores_a_hold_out_and_trains_without_it(make_config):
    from gossipfl.learning.tasks.digits import DigitsTask

    data = DigitsTask().load_data(2026)
    configs = [make_config(partition="0/2"), make_config(partition="0/2", eval_split="validation")]
    async with running(*configs) as (plain, held):
        assert await wait_for(lambda: all(n.last_eval is not None for n in (plain, held)), 10)
        assert len(plain.learner._y_test) == len(data.test)
        assert len(held.learner._y_test) == math.ceil(0.2 * len(data.train))  # as scikit-learn rounds it
        test_rows = {r.tobytes() for r in data.test.x}
        assert not any(r.tobytes() in test_rows for r in held.learner._x_test.cpu().numpy())
        assert held.status()["samples"] < plain.status()["samples"]  # the hold-out left the shards
        assert held.status()["eval_split"] == "validation" and plain.status()["eval_split"] == "test"
        # nodes that hold out and nodes that do not cut different shards: they do not gossip together
        assert held.status()["split"].endswith("/validation") and held.identity.split != plain.identity.split


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--task", "no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
        (["--task", "tabular", "--data", "/nonexistent.npz"], "No such file"),
    ],
)
def test_cli_task_errors_are_one_line_exit_2(args, fragment):
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--mdns-interface", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gossipfl: error:") and fragment in lines[0], r.stderr


def test_nodes_loading_data_at_once_in_a_fresh_process_do_not_race_on_imports(tmp_path):
    """Defect 9: nodes with different tasks starting together in one process imported scikit-learn in
    two worker threads at once: "partially initialized module 'sklearn.base'". The built-in tasks no
    longer import scikit-learn, but a user's task may, lazily in load_data; two such tasks, importing
    different parts of it, race in about half of fresh interpreters unless tasks load one at a time."""
    (tmp_path / "racy.py").write_text(RACY_TASKS)
    script = f"""
import concurrent.futures, sys
sys.path.insert(0, {str(tmp_path)!r})
from gossipfl.learning.registry import get_task, load_checked
tasks = [get_task("racy:Iris"), get_task("racy:Scaled")] * 3
with concurrent.futures.ThreadPoolExecutor(6) as pool:
    sizes = list(pool.map(lambda t: len(load_checked(t, 2026).train), tasks))
print(sizes)
"""
    for _ in range(6):  # each run is a fresh interpreter, where nothing has imported scikit-learn yet
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == "[120, 120, 120, 120, 120, 120]"


RACY_TASKS = """
import numpy as np
from torch import nn

from gossipfl import ClassificationTask, Dataset, InputSpec, TaskData, split


class Iris(ClassificationTask):
    name = "racy-iris"
    input_spec = InputSpec((4,), "float32")

    def load_data(self, data_seed):
        from sklearn.datasets import load_iris

        x, y = load_iris(return_X_y=True)
        train, test = split(x.astype(np.float32), y.astype(np.int64), data_seed)
        return TaskData(train, test, 3)

    def build_model(self):
        return nn.Linear(4, 3)


class Scaled(Iris):
    name = "racy-scaled"

    def load_data(self, data_seed):
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        x = StandardScaler().fit_transform(np.random.default_rng(0).normal(size=(150, 4))).astype(np.float32)
        y = (np.arange(150) % 3).astype(np.int64)
        a, b, c, d = train_test_split(x, y, test_size=0.2, random_state=data_seed, stratify=y)
        return TaskData(Dataset(a, c), Dataset(b, d), 3)
"""


def test_the_bundled_digits_are_scikit_learns():
    from sklearn.datasets import load_digits as sklearn_digits

    from gossipfl.learning.tasks.digits import load_digits

    x, y = load_digits()
    xs, ys = sklearn_digits(return_X_y=True)
    assert x.shape == (1797, 64) and (x == xs).all() and (y == ys).all()


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=5, max_size=300),
    seed=st.integers(0, 2**31 - 1),
    test_fraction=st.sampled_from([0.1, 0.2, 0.25, 0.5]),
)
def test_the_split_is_scikit_learns_train_test_split(labels, seed, test_fraction):
    """Same indices as sklearn's train_test_split (stratified when every class has two samples), so
    every split, and every number measured on one, stays what it was before scikit-learn left the
    runtime dependencies."""
    from sklearn.model_selection import train_test_split

    from gossipfl.learning.splitting import split_indices

    y = np.array(labels)
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    try:
        expected = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=stratify)
    except ValueError:
        with pytest.raises(ValueError):
            split_indices(y, test_fraction, seed)
        return
    train, test = split_indices(y, test_fraction, seed)
    assert train.tolist() == expected[0].tolist() and test.tolist() == expected[1].tolist()


def test_a_node_process_imports_neither_scikit_learn_nor_scipy():
    code = (
        "import sys\n"
        "from gossipfl.learning.registry import get_task, load_checked\n"
        "for name in ('digits', 'digits-cnn'):\n"
        "    load_checked(get_task(name), 2026)\n"
        "import gossipfl.node, gossipfl.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
