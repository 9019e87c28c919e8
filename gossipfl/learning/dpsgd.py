"""DP-SGD for a Learner's own training loop, through Opacus: per-sample gradients (``GradSampleModule``),
per-sample clipping and Gaussian noise (``DPOptimizer``), Poisson sampling (each local record is in a
step's batch with probability q, independently), and the accountant (accounting.py) that counts every
step, the empty ones too, and stops local training before the epsilon budget would be exceeded.

The raw model stays the canonical one: Opacus' hooks sit on its layers, and nothing here wraps the model
that merges, snapshots, checkpoints and serving see (no ``_module.`` prefix anywhere). The task's own
``train_step`` runs with the DP optimizer, so a task's loss must be a mean over the batch of per-record
losses (cross-entropy is).

Randomness: the batch draws and the noise never come from ``--seed`` (every node's default is 0: noise
that anyone can regenerate protects nothing). Without ``--dp-secure-rng`` they come from torch generators
seeded from the operating system's entropy at start; with it, every draw comes from ``os.urandom`` (the
kernel's CSPRNG, what Opacus' ``secure_mode`` gets from torchcsprng's urandom generator, which has no
build for this torch), and each noise value is the sum of four Gaussians halved, as in ``secure_mode``
(against floating-point attacks on the Gaussian sampler)."""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

from gossipfl.learning.accounting import HORIZON, PRV_MAX_STEPS, Accountant, parse_history
from gossipfl.learning.dpledger import PrivacyLedger
from gossipfl.learning.privacy import BudgetSpent, DPSettings, PrivacyViolation
from gossipfl.learning.task import Task

# torch's warning that the first layer's full backward hook (Opacus') sees no gradient of the layer's input
# (model inputs never require one): expected, and nothing for an operator to act on
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to")
PRV_SHARE = 0.1  # under PRV, the epsilon shown is recomputed when that keeps its cost under this share of time
RESERVE_S = 1.0  # the ledger reserves about this many seconds' worth of steps at a time (one fsync each)


def secure_normal(count: int) -> np.ndarray:
    """``count`` standard normal values from the OS CSPRNG: Box-Muller on 53-bit uniforms, float64."""
    bits = np.frombuffer(os.urandom(16 * count), dtype=np.uint64).reshape(2, count) >> np.uint64(11)
    u1 = (bits[0] + 1) * 2.0**-53  # (0, 1]: the logarithm is finite
    u2 = bits[1] * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def secure_uniform(count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) from the OS CSPRNG (53-bit)."""
    return (np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)) * 2.0**-53


class CountingDPOptimizer(DPOptimizer):
    """``DPOptimizer`` that counts its ``step`` calls: a task's train_step must make exactly one."""

    calls = 0

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        self.calls += 1
        return super().step(closure)


class SecureNoiseDPOptimizer(CountingDPOptimizer):
    """``DPOptimizer`` whose noise comes from ``secure_normal``: std * (z1 + z2 + z3 + z4) / 2 per value,
    Opacus' ``secure_mode`` construction on a CSPRNG (with Opacus' checks that each summed gradient is
    noised once)."""

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            z = secure_normal(4 * p.summed_grad.numel()).reshape(4, -1).sum(axis=0) / 2.0
            noise = torch.from_numpy(std * z).to(device=p.summed_grad.device, dtype=p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


def check_model(model: nn.Module) -> None:
    """ValueError, one line, when Opacus cannot train ``model`` with DP-SGD (BatchNorm, for one)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        first = str(errors[0]).split(". ")[0].rstrip(".")
        raise ValueError(f"differential privacy: this model cannot be trained with DP-SGD: {first}")


class PrivateTraining:
    """The DP-SGD engine of one Learner. The Learner calls ``attach`` once, ``allowed`` before each round,
    ``step`` per minibatch step (under its lock), ``refresh`` after a round; ``export``/``check``/``restore``
    for checkpoints. ``seed``: for tests only (None, a node's case, seeds from the OS)."""

    def __init__(self, settings: DPSettings, *, seed: int | None = None) -> None:
        self.settings = settings
        self.accountant = Accountant(settings.accountant, settings.delta)
        self.exhausted = False
        self.violation: str | None = None  # why local training stopped for good: the task bypassed DP-SGD
        self.spent: tuple[int, float] = (0, 0.0)  # (steps, the epsilon they spent) at the last computation
        self.limit: int | None = None  # the total steps the budget allows (searched when first needed)
        self.notify: Callable[[str], None] = lambda line: None  # one line when the budget is spent
        base = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed
        self._sampler = torch.Generator().manual_seed(base)
        self._noise_seed = base + 1
        self._noise: torch.Generator | None = None  # made on the model's device by ``attach``
        self._optimizer: CountingDPOptimizer | None = None
        self._hooks: GradSampleModule | None = None
        self._searched_from = 0  # the step count the limit was searched from
        self._refreshed_at = -math.inf
        self._cost = 0.0
        # the write-ahead ledger (dpledger.py; None: in-process use without a state directory): every step
        # counted is within ``reserved``, which is durably in the ledger before the step is taken
        self.ledger: PrivacyLedger | None = None
        self.reserved = 0
        self._block, self._reserved_at, self._want = 1, -math.inf, 1
        self._ledger_lock = threading.Lock()  # a step's reservation against the write at stop
        self._buffers: list[torch.Tensor] = []  # floating-point buffers: DP-SGD must leave them as they are

    # -- training ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Put Opacus' per-sample gradient hooks on ``model``'s layers (ValueError, one line, when it cannot
        be trained privately). The model itself is not wrapped: its state dict keys stay as they are."""
        check_model(model)
        try:
            self._hooks = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        except NotImplementedError as e:
            raise ValueError(f"differential privacy: this model cannot be trained with DP-SGD: {e}") from None
        self._buffers = [b for b in model.buffers() if b.is_floating_point()]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._noise = torch.Generator(device=device).manual_seed(self._noise_seed)

    def _dp_optimizer(self, optimizer: torch.optim.Optimizer) -> CountingDPOptimizer:
        """The DP optimizer over the Learner's own (made again when the Learner replaced it at a load)."""
        if self._optimizer is None or self._optimizer.original_optimizer is not optimizer:
            s = self.settings
            kind = SecureNoiseDPOptimizer if s.secure_rng else CountingDPOptimizer
            self._optimizer = kind(
                optimizer,
                noise_multiplier=s.noise_multiplier,
                max_grad_norm=s.max_grad_norm,
                expected_batch_size=s.expected_batch,
                loss_reduction="mean",
                generator=None if s.secure_rng else self._noise,
                secure_mode=s.secure_rng,
            )
        return self._optimizer

    def batch(self, n: int) -> torch.Tensor:
        """Poisson sampling: the indices of the records drawn into one step's batch, each with probability q."""
        q = self.settings.sample_rate
        if self.settings.secure_rng:
            return torch.from_numpy(np.flatnonzero(secure_uniform(n) < q))
        return torch.nonzero(torch.rand(n, generator=self._sampler) < q).flatten()

    def allowed(self, steps: int) -> int:
        """How many of the next ``steps`` the budget allows (all of them without a budget); 0 means the
        budget is spent, for good. Blocking under PRV the first time (the search for the limit)."""
        s = self.settings
        if self.violation is not None:
            return 0
        if s.budget is None or self.exhausted:
            return 0 if self.exhausted else steps
        done = self.accountant.steps
        if self.limit is None or (self.limit - done < steps and self.limit - self._searched_from == HORIZON):
            self._searched_from = done
            self.limit = done + self.accountant.affordable(s.noise_multiplier, s.sample_rate, s.budget)
        allowed = max(0, min(steps, self.limit - done))
        self._want = max(allowed, 1)  # (the next reservation covers this round at least)
        if self.ledger is not None and self.accountant.steps + allowed > self.reserved:
            with self._ledger_lock:  # (here, not under the Learner's lock in ``step``: merges go on)
                self._reserve()
        if allowed == 0:
            self.exhausted = True
            self.refresh(force=True)
            self.notify(
                f"privacy budget spent: epsilon {self.epsilon:.6g} of {s.budget:.6g} (delta {s.delta:g}) after "
                f"{self.spent[0]} DP-SGD steps; local training stopped for good, gossip and serving go on"
            )
        return allowed

    def step(
        self, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> float | None:
        """One DP-SGD step on a Poisson batch of (x, y); its loss, or None when the batch was empty (DP-SGD
        then still takes its step, of noise alone). The step is in the ledger, and counted by the accountant,
        before it is taken (LedgerError: the ledger cannot be written, no step). PrivacyViolation when the
        task's train_step bypassed DP-SGD: not exactly one DP optimizer step, or a floating-point buffer
        changed (buffers are gossiped: a buffer computed from the batch would be released without noise)."""
        dp = self._dp_optimizer(optimizer)
        idx = self.batch(len(y))
        with self._ledger_lock:
            if self.ledger is not None and self.accountant.steps >= self.reserved:
                self._reserve()
            self.accountant.step(self.settings.noise_multiplier, self.settings.sample_rate)
        model.train()
        dp.calls = 0
        if len(idx) == 0:
            dp.zero_grad(set_to_none=True)
            for p in dp.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            dp.step()
            return None
        idx = idx.to(y.device)
        buffers = [b.clone() for b in self._buffers]
        loss = float(task.train_step(model, dp, x[idx], y[idx]))
        if dp.calls != 1:
            self.violation = (
                f"differential privacy: the task's train_step made {dp.calls} steps of the DP optimizer it was given, "
                "not exactly one (its own optimizer bypasses DP-SGD); local training stopped"
            )
        elif any(not torch.equal(a, b) for a, b in zip(buffers, self._buffers, strict=True)):
            self.violation = (
                "differential privacy: a floating-point buffer of the model changed in a DP-SGD step (computed "
                "from the batch, it would be gossiped without noise); local training stopped"
            )
        if self.violation is not None:
            raise PrivacyViolation(self.violation)
        return loss

    # -- the write-ahead ledger -------------------------------------------------------------------
    def open_ledger(self, ledger: PrivacyLedger) -> None:
        """Count every step the ledger records as spent (LedgerError: it exists but cannot be read) and
        record every step from now on in it before it is taken."""
        history = ledger.read()
        if sum(r[2] for r in history) > self.accountant.steps:
            self.restore((history, Accountant(self.settings.accountant, self.settings.delta, history).epsilon()))
        self.ledger, self.reserved = ledger, self.accountant.steps

    def _reserve(self) -> None:
        """Write the history with the next block of steps (about RESERVE_S seconds' worth, this round's at
        least, never past the budget's limit) to the ledger, durably (caller holds ``_ledger_lock``)."""
        assert self.ledger is not None
        now = time.monotonic()
        if now - self._reserved_at < RESERVE_S / 2:
            self._block *= 2
        elif now - self._reserved_at > 2 * RESERVE_S:
            self._block = max(1, self._block // 2)
        block = max(self._block, self._want)
        if self.limit is not None:
            block = max(1, min(block, self.limit - self.accountant.steps))
        s = self.settings
        planned = Accountant(s.accountant, s.delta, self.accountant.history)
        planned.step(s.noise_multiplier, s.sample_rate, block)
        self.ledger.write(planned.history)  # LedgerError: not one step without it
        self.reserved, self._reserved_at = planned.steps, now

    def close(self) -> None:
        """At a clean stop: the ledger records the steps taken, not the ones reserved (a step after this
        reserves again)."""
        with self._ledger_lock:
            if self.ledger is not None and self.reserved > self.accountant.steps:
                self.ledger.write(self.accountant.history)
                self.reserved = self.accountant.steps

    def check_start(self) -> int:
        """At start, after the ledger and the checkpoint: the steps the budget still allows (all of them
        without a budget). BudgetSpent, one line, when it allows none; ValueError under PRV when RDP's count
        allows more than PRV can count (PRV_MAX_STEPS). Blocking (PRV: seconds)."""
        s = self.settings
        if s.budget is None:
            return HORIZON
        done = self.accountant.steps
        if s.accountant == "prv":
            rdp = self.accountant.rdp_affordable(s.noise_multiplier, s.sample_rate, s.budget)
            if done + rdp > PRV_MAX_STEPS:
                raise ValueError(
                    f"dp-accountant prv: the budget allows {done + rdp} steps or more, over the {PRV_MAX_STEPS} that "
                    "prv can count (its cost grows with the steps); use --dp-accountant rdp"
                )
        self._searched_from = done
        self.limit = done + self.accountant.affordable(s.noise_multiplier, s.sample_rate, s.budget)
        if self.limit == done:
            epsilon = self.accountant.epsilon()
            raise BudgetSpent(
                f"privacy budget allows no step: {done} DP-SGD steps recorded spend epsilon {epsilon:.6g} and one "
                f"more step would exceed --dp-epsilon-budget {s.budget:.6g} (noise multiplier "
                f"{s.noise_multiplier:.4g}, sample rate {s.sample_rate:.4g}, delta {s.delta:g}, {s.accountant}); "
                "this node's data must not be trained on again"
            )
        return self.limit - done

    # -- the epsilon spent ------------------------------------------------------------------------
    def refresh(self, *, force: bool = False) -> None:
        """Recompute the epsilon shown (``spent``). RDP: always (microseconds). PRV:
        when forced, or when its last cost is under ``PRV_SHARE`` of the time since the last one."""
        now = time.monotonic()
        if self.accountant.steps == self.spent[0]:
            return
        if not force and self.settings.accountant == "prv" and (now - self._refreshed_at) * PRV_SHARE < self._cost:
            return
        steps = self.accountant.steps
        self.spent = (steps, self.accountant.epsilon())  # one assignment: readers on the event loop see a pair
        self._refreshed_at = time.monotonic()
        self._cost = self._refreshed_at - now

    @property
    def epsilon(self) -> float:
        """The epsilon spent, as of the last computation (``spent``)."""
        return self.spent[1]

    # -- checkpoints ------------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        """The checkpoint's ``privacy`` record (JSON): the accountant's history, authoritative, and the last
        epsilon computed, for people (null when not finite). Cheap: called under the Learner's lock."""
        steps, epsilon = self.spent
        return {
            "accountant": self.settings.accountant,
            "delta": self.settings.delta,
            "history": [list(run) for run in self.accountant.history],
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "epsilon_steps": steps,
        }

    def check(self, record: object) -> tuple[list, float]:
        """(history, epsilon) of a checkpoint's ``privacy`` record, recomputed with this node's accountant
        and delta. ValueError (the checkpoint is set aside) when there is none or it is malformed;
        ``BudgetSpent`` (the node must not start) when its epsilon is at or over the budget."""
        if record is None:
            raise ValueError("its model was trained without differential privacy, which no accountant can bound")
        if not isinstance(record, dict):
            raise ValueError("its privacy record is not a JSON object")
        history = parse_history(record.get("history"))
        epsilon = Accountant(self.settings.accountant, self.settings.delta, history).epsilon()
        budget = self.settings.budget
        if budget is not None and epsilon >= budget:
            steps = sum(run[2] for run in history)
            raise BudgetSpent(
                f"privacy budget already spent: the checkpoint's {steps} DP-SGD steps spent epsilon {epsilon:.6g} "
                f"(delta {self.settings.delta:g}, {self.settings.accountant}), at or over --dp-epsilon-budget "
                f"{budget:.6g}; this node's data must not be trained on again"
            )
        return history, epsilon

    def restore(self, checked: tuple[list, float]) -> None:
        """Continue the accounting from a record ``check`` accepted."""
        history, epsilon = checked
        if sum(r[2] for r in history) < self.accountant.steps:
            return  # the ledger (counted first) already has more: a count never goes down
        self.accountant.history = list(history)
        self.spent = (self.accountant.steps, epsilon)
        self.limit, self.exhausted = None, False

    def describe(self) -> dict[str, Any]:
        """``/v1/status`` ``privacy`` (plain reads: called on the event loop)."""
        s, (steps, epsilon) = self.settings, self.spent
        return {
            "enabled": True,
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "delta": s.delta,
            "noise_multiplier": s.noise_multiplier,
            "max_grad_norm": s.max_grad_norm,
            "sample_rate": s.sample_rate,
            "steps": steps,
            "budget": s.budget,
            "budget_steps": self.limit,
            "exhausted": self.exhausted,
            "accountant": s.accountant,
            "secure_rng": s.secure_rng,
        }
