"""The Learner owns one model: local training steps, evaluation, and atomic parameter updates.

Training runs in a worker thread while the event loop serves HTTP and gossips, so every access to the
parameters goes through one lock, and nothing the event loop calls waits for it (``trained`` and the
counters are plain reads). Parameters leave the Learner only as numpy copies.

What a node gossips is its model's *state*: the parameters and the floating-point buffers (BatchNorm
running mean and variance), averaged alike. Integer buffers (BatchNorm's ``num_batches_tracked``) are
counters of this node's own batches and stay local.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from gossipfl.learning.normalize import standardizer_buffers
from gossipfl.learning.privacy import PrivacyViolation
from gossipfl.learning.task import Dataset, Evaluation, Task

if TYPE_CHECKING:  # (dpsgd imports Opacus: only a node with DP loads it)
    from gossipfl.learning.dpsgd import PrivateTraining

Params = dict[str, np.ndarray]
T = TypeVar("T")
MAX_AGE = 2**53  # the wire's bound (wire.MAX_AGE): a node never makes a model it could not send


@dataclass(frozen=True)
class Saved:
    """What a Learner needs to continue where it left off (a checkpoint's content, see gossipfl/state.py):
    the working model's whole state dict, the optimizer's per-parameter state, the counters, and where the
    minibatch order stands."""

    model: Params  # the working model's state dict (parameters and every buffer)
    optimizer: dict[str, np.ndarray]  # "<param index>.<name>" -> tensor (momentum buffer, Adam's moments, step)
    optimizer_scalars: dict[str, float]  # "<param index>.<name>" -> a non-tensor value of the same state
    age: int
    steps: int
    merges: int
    weight: float
    rng: np.ndarray  # the minibatch generator's state (uint8)
    order: np.ndarray  # the current epoch's permutation of the training samples (int64)
    cursor: int  # how far into ``order`` the next batch starts
    privacy: dict[str, Any] | None = None  # with DP: the accountant's record (dpsgd.PrivateTraining.export)


@dataclass(frozen=True)
class State:
    params: Params  # the gossiped state: parameters and floating-point buffers
    age: int  # local training steps the model embodies (max over merged ancestors, see merge.py)
    version: int  # bumped by every change: a train step or a merge
    weight: float  # push-sum weight, changed only by merges
    merges: int = 0  # bumped by every merge only


class Diverged(ArithmeticError):
    """A training step gave a loss that is not finite; the working copy was restored."""


def gossiped_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a node gossips: every parameter and every floating-point buffer of the state dict
    (integer buffers, such as BatchNorm's batch counter, stay local)."""
    return {
        name: t
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, nn.Parameter) or t.is_floating_point()
    }


def _cpu_copies(tensors: Mapping[str, torch.Tensor]) -> Params:
    """Numpy copies on the CPU (parameters leave a Learner only as copies)."""
    return {name: t.detach().to("cpu", copy=True).numpy() for name, t in tensors.items()}


def _cpu_views(tensors: Mapping[str, torch.Tensor]) -> Params:
    """The tensors as numpy arrays over their own memory where they are on the CPU, copies elsewhere."""
    return {name: (t.detach() if t.device.type == "cpu" else t.detach().cpu()).numpy() for name, t in tensors.items()}


def build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model with a seeded init without disturbing torch's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def resolve_device(name: str, cuda_devices: int | None = None) -> str:
    """The torch device a node trains on: ``auto`` picks ``cuda`` when a GPU is present, else ``cpu``;
    ``cuda``/``cuda:N`` must exist. ``cuda_devices`` defaults to ``torch.cuda.device_count()``.
    Raises ``ValueError`` with a one-line reason."""
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if name == "auto":
        return "cuda" if count > 0 else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device (torch " + torch.__version__ + ")"
            raise ValueError(f"device {name}: not available, found {found}; use --device cpu or auto")
        return name
    raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, params: Iterable[nn.Parameter], *, lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


class Learner:
    def __init__(
        self,
        task: Task,
        model: nn.Module,
        train: Dataset,
        test: Dataset,
        *,
        seed: int,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        lr_decay_steps: float = 0.0,
        batch_size: int = 32,
        weight: float = 1.0,
        device: str = "cpu",
        publish_after_steps: int = 0,
        privacy: PrivateTraining | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # The served model: what evaluate() scores and what a node answers queries with. It is a copy of the
        # working model taken at every merge, so it is the node's latest view of the network's consensus,
        # not the working copy halfway through a run of local steps on local data (on skewed data those
        # steps pull the working copy towards the local classes until the next merge). A node that has made
        # more than ``publish_after_steps`` local steps since its last merge (alone, or cut off) serves its
        # working copy instead; 0 always serves the working copy.
        self.serving = copy.deepcopy(self.model).eval()
        self.publish_after_steps = publish_after_steps
        self.served_age = 0
        self._published = False  # the served model is still the bare initialisation
        self._unpublished_steps = 0
        self._named = gossiped_tensors(self.model)
        self.statistics = frozenset(standardizer_buffers(self.model))  # see protocol/merge.keep_convex
        # Optimizer state (Adam's moments, SGD's momentum buffer) is kept across merges: partners' models
        # are close after averaging, so the running gradient statistics stay valid, and resetting them
        # would restart Adam's bias correction at every exchange.
        self.optimizer = make_optimizer(optimizer, self.model.parameters(), lr=lr, momentum=momentum)
        self.lr = lr
        self.lr_decay_steps = lr_decay_steps
        self.task = task
        self.batch_size = batch_size
        self.train_size = len(train)
        self._x = torch.as_tensor(train.x, device=self.device)
        self._y = torch.as_tensor(train.y, device=self.device)
        self._x_test = torch.as_tensor(test.x, device=self.device)
        self._y_test = torch.as_tensor(test.y, device=self.device)
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._lock = threading.Lock()
        self.age = 0
        self.steps = 0  # local minibatch steps this learner made (age also counts merged-in steps)
        self.version = 0
        self.merges = 0
        self.weight = float(weight)
        # DP-SGD (learning/dpsgd.py): Opacus' hooks go on the working model's layers, after the served copy
        # was taken; batches are then Poisson draws of the engine's, and ``_gen``/``_order`` stay unused
        self.privacy = privacy
        if privacy is not None:
            privacy.attach(self.model)

    # -- parameters -------------------------------------------------------------------------------
    def _params_copy(self) -> Params:
        return _cpu_copies(self._named)

    def _state(self) -> State:
        return State(self._params_copy(), self.age, self.version, self.weight, self.merges)

    def snapshot(self) -> State:
        with self._lock:
            return self._state()

    def update(self, fn: Callable[[State], tuple[Params, int, float]]) -> None:
        """Atomically set (state, age, weight) to ``fn(state)`` (a merge). ``fn`` sees the model's tensors
        themselves where they live on the CPU (no copy of the model is made; it may change them in place and
        return them), copies where they do not; it must not keep them."""
        with self._lock:
            now = State(_cpu_views(self._named), self.age, self.version, self.weight, self.merges)
            params, age, weight = fn(now)
            with torch.no_grad():
                for name, p in self._named.items():
                    value = params[name]
                    if value is not now.params[name] or p.device.type != "cpu":  # (else: changed in place)
                        p.copy_(torch.from_numpy(np.ascontiguousarray(value)))
            self.age, self.weight = age, float(weight)
            self.version += 1
            self.merges += 1
            self._publish()

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Saved:
        """Everything needed to continue from here, copied under the lock (one consistent moment)."""
        with self._lock:
            tensors: dict[str, np.ndarray] = {}
            scalars: dict[str, float] = {}
            for index, state in self.optimizer.state_dict()["state"].items():
                for name, value in state.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{index}.{name}"] = value.detach().to("cpu", copy=True).numpy()
                    elif isinstance(value, (int, float)) and not isinstance(value, bool):
                        scalars[f"{index}.{name}"] = float(value)
            return Saved(
                model=_cpu_copies(self.model.state_dict()),
                optimizer=tensors,
                optimizer_scalars=scalars,
                age=self.age,
                steps=self.steps,
                merges=self.merges,
                weight=self.weight,
                rng=self._gen.get_state().numpy().copy(),
                order=self._order.numpy().copy(),
                cursor=self._cursor,
                privacy=self.privacy.export() if self.privacy is not None else None,
            )

    def load(self, saved: Saved) -> None:
        """Continue from ``saved`` (a checkpoint of a Learner of the same model and shard): the working model,
        optimizer state, counters and minibatch order; the served model becomes the working copy. Raises
        ValueError, changing nothing, when it does not fit this Learner."""
        own = self.model.state_dict()
        if set(saved.model) != set(own):
            raise ValueError("the saved model has other tensors than this one")
        for name, t in own.items():
            if tuple(saved.model[name].shape) != tuple(t.shape):
                raise ValueError(f"tensor {name}: saved shape {saved.model[name].shape}, model {tuple(t.shape)}")
        if len(saved.order) not in (0, self.train_size) or not 0 <= saved.cursor:
            raise ValueError("the saved minibatch order is for another shard")
        if not (math.isfinite(saved.weight) and saved.weight > 0) or not 0 <= saved.age <= MAX_AGE:
            raise ValueError(f"saved weight {saved.weight} or age {saved.age} out of range")
        # every piece is checked on a scratch object first: nothing changes unless all of it fits
        state: dict[int, dict[str, object]] = {}
        try:
            for key, value in [*saved.optimizer.items(), *saved.optimizer_scalars.items()]:
                index, _, name = key.partition(".")
                value = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
                state.setdefault(int(index), {})[name] = value
            optimizer = type(self.optimizer)(self.model.parameters(), **self.optimizer.defaults)
            optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
            torch.Generator().set_state(torch.from_numpy(np.array(saved.rng, dtype=np.uint8)))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"the saved optimizer or minibatch state does not fit: {type(e).__name__}: {e}") from None
        # with DP, the accountant's record must be there (ValueError), and leave budget (privacy.BudgetSpent)
        privacy = self.privacy.check(saved.privacy) if self.privacy is not None else None
        with self._lock:
            self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in saved.model.items()})
            self.optimizer = optimizer
            self.age, self.steps, self.merges = int(saved.age), int(saved.steps), int(saved.merges)
            self.weight = float(saved.weight)
            self._gen.set_state(torch.from_numpy(np.array(saved.rng, dtype=np.uint8)))
            self._order = torch.from_numpy(np.array(saved.order, dtype=np.int64))
            self._cursor = int(saved.cursor)
            if self.privacy is not None and privacy is not None:
                self.privacy.restore(privacy)
            self.version += 1
            self._publish()

    # -- training and evaluation -----------------------------------------------------------------
    def _next_batch(self) -> torch.Tensor:
        if self._cursor >= len(self._order):
            self._order = torch.randperm(self.train_size, generator=self._gen)
            self._cursor = 0
        idx = self._order[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return idx.to(self.device)

    def lr_at(self, steps: int) -> float:
        """Step size after this node's own ``steps``: lr / (1 + steps / lr_decay_steps), constant when 0.

        With a constant step, decentralized SGD stops short of consensus: between exchanges each node
        drifts by an amount proportional to the step, so the models' spread plateaus. A harmonic decay
        (sum of steps infinite, sum of squares finite: Robbins-Monro) lets the spread keep shrinking.
        It counts the node's own steps, not the model's age: the age is a claim peers make, and one
        message must not be able to stop a node's learning by claiming a huge one."""
        if self.lr_decay_steps <= 0:
            return self.lr
        return self.lr / (1.0 + steps / self.lr_decay_steps)

    def train_steps(self, steps: int) -> float | None:
        """Run ``steps`` minibatch steps; return their mean loss. A step whose loss is not finite restores
        the working copy from the served model (the last merge), clears the optimizer's state and raises
        ``Diverged``; an exception from the task's step propagates (the steps before it are kept).

        With DP (``privacy``): DP-SGD steps on Poisson batches, as many of ``steps`` as the budget allows
        (none once it is spent); the mean loss over the non-empty batches, None when there was none. A
        step diverged when the parameters are not finite (a check on the DP release, not on the data)."""
        if self.privacy is not None:
            steps = self.privacy.allowed(steps)
        total, losses = 0.0, 0
        for _ in range(steps):
            with self._lock:  # (the minibatch order too: a checkpoint taken between steps continues exactly)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(self.steps)
                if self.privacy is None:
                    idx = self._next_batch()
                    self.model.train()
                    loss = float(self.task.train_step(self.model, self.optimizer, self._x[idx], self._y[idx]))
                    finite = math.isfinite(loss)
                else:
                    try:  # (PrivacyViolation: the task bypassed DP-SGD; its non-private step is undone)
                        loss = self.privacy.step(self.task, self.model, self.optimizer, self._x, self._y)
                    except PrivacyViolation:
                        self._restore()
                        raise
                    finite = all(bool(torch.isfinite(t).all()) for t in self._named.values())
                if not finite:
                    self._restore()
                    what = f"loss {loss}" if self.privacy is None else "parameters not finite"
                    raise Diverged(f"{what} at step {self.steps}: restored the model of the last merge")
                self.age = min(self.age + 1, MAX_AGE)
                self.steps += 1
                self.version += 1
                self._unpublished_steps += 1
            if loss is not None:
                total, losses = total + loss, losses + 1
        if self.privacy is not None:
            self.privacy.refresh()
        return total / losses if losses else None

    def _restore(self) -> None:
        """Working copy := served model, optimizer state cleared (caller holds the lock)."""
        self.model.load_state_dict(self.serving.state_dict())
        self.optimizer.state.clear()
        self.version += 1
        self._unpublished_steps = 0

    def _publish(self) -> None:
        """Copy the working model into the served one (caller holds the lock)."""
        self.serving.load_state_dict(self.model.state_dict())
        self.served_age = self.age
        self._published = True
        self._unpublished_steps = 0

    def _refresh_serving(self) -> None:
        if self._unpublished_steps > self.publish_after_steps:
            self._publish()

    @property
    def trained(self) -> bool:
        """The served model has been trained or merged at least once, or will be at the next read
        (readiness to answer queries). Lock-free: the event loop asks it for readiness probes."""
        return self._published or self._unpublished_steps > self.publish_after_steps

    @property
    def unpublished_steps(self) -> int:
        """Local steps the working copy has made since the served model was taken from it."""
        return self._unpublished_steps

    def evaluate(self) -> Evaluation:
        """Score the served model on the test split."""
        with self._lock, torch.no_grad():
            self._refresh_serving()
            return self.task.evaluate(self.serving, self._x_test, self._y_test)

    def with_served(self, fn: Callable[[nn.Module], T]) -> T:
        """Run ``fn`` on the served model, under the lock and without gradients (inference, export)."""
        with self._lock, torch.no_grad():
            self._refresh_serving()
            return fn(self.serving)

    def served_state(self) -> tuple[Params, int]:
        """The served model's full state dict (parameters and buffers) as CPU numpy copies, and its age."""
        with self._lock, torch.no_grad():
            self._refresh_serving()
            return _cpu_copies(self.serving.state_dict()), self.served_age

    def evaluate_working(self) -> Evaluation:
        """Score the working copy (the model local training is changing) on the test split."""
        with self._lock, torch.no_grad():
            self.model.eval()
            return self.task.evaluate(self.model, self._x_test, self._y_test)
