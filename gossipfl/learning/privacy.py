"""Differential privacy of local training (DP-SGD), the light half: the options, their checks, and the
settings a node trains with once it knows its local sample count. Importing it does not import Opacus;
the training engine (``dpsgd.py``) and the accountant (``accounting.py``) do, and are loaded only by a
node that trains with DP. See docs/privacy.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_MAX_GRAD_NORM = 1.0


class BudgetSpent(Exception):
    """A checkpoint's spent epsilon is already at or over the budget: the node must not start (exit 2).
    Not a ValueError on purpose: nothing that sets an unusable checkpoint aside may swallow it."""


class LedgerError(Exception):
    """The privacy ledger (dpledger.py) exists but cannot be read, or cannot be written: no DP-SGD step may
    be taken (at start: the node must not start, exit 2)."""


class PrivacyViolation(RuntimeError):
    """A task's train_step bypassed DP-SGD (not exactly one DP optimizer step, or a floating-point buffer
    changed by the batch): local training stops for good (the node fails, exit 1)."""


class DPOptions(Protocol):
    """The ``--dp-*`` options as ``NodeConfig`` holds them."""

    dp_noise_multiplier: float | None
    dp_max_grad_norm: float | None
    dp_delta: float | None
    dp_epsilon_budget: float | None
    dp_target_epsilon: float | None
    dp_steps: int | None
    dp_accountant: str
    dp_secure_rng: bool
    no_train: bool
    state_dir: str | None


def enabled(o: DPOptions) -> bool:
    """DP is on when a noise multiplier or a target epsilon is given."""
    return o.dp_noise_multiplier is not None or o.dp_target_epsilon is not None


def check_options(o: DPOptions) -> None:
    """Raise ValueError, one line, for contradictory or out-of-range ``--dp-*`` options (those that need
    the local sample count are checked by ``settings``, at start)."""
    on = "--dp-noise-multiplier or --dp-target-epsilon"
    if o.dp_accountant not in ACCOUNTANTS:
        raise ValueError(f"dp-accountant {o.dp_accountant!r}: expected rdp or prv")
    positive = (("noise-multiplier", o.dp_noise_multiplier), ("max-grad-norm", o.dp_max_grad_norm))
    positive += (("epsilon-budget", o.dp_epsilon_budget), ("target-epsilon", o.dp_target_epsilon))
    for name, value in positive:
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"dp-{name} {value}: must be a number > 0")
    if o.dp_delta is not None and not 0 < o.dp_delta < 1:
        raise ValueError(f"dp-delta {o.dp_delta}: must be in (0, 1)")
    if o.dp_steps is not None and o.dp_steps < 1:
        raise ValueError(f"dp-steps {o.dp_steps}: must be >= 1")
    if o.dp_noise_multiplier is not None and o.dp_target_epsilon is not None:
        raise ValueError("give --dp-noise-multiplier or --dp-target-epsilon (which derives it), not both")
    if (o.dp_target_epsilon is None) != (o.dp_steps is None):
        raise ValueError(
            "--dp-target-epsilon and --dp-steps go together: the noise is derived for a planned step count"
        )
    if not enabled(o):
        given = [
            flag
            for flag, value in (
                ("--dp-max-grad-norm", o.dp_max_grad_norm),
                ("--dp-delta", o.dp_delta),
                ("--dp-epsilon-budget", o.dp_epsilon_budget),
                ("--dp-secure-rng", o.dp_secure_rng or None),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{given[0]} needs {on}: without one of them local training is not private")
        return
    if o.no_train:
        raise ValueError("differential privacy is about local training: --no-train has none")
    if o.dp_target_epsilon is not None and o.dp_epsilon_budget is not None:
        if o.dp_epsilon_budget < o.dp_target_epsilon:
            raise ValueError(
                f"dp-epsilon-budget {o.dp_epsilon_budget} is below dp-target-epsilon {o.dp_target_epsilon}: "
                "the planned steps could not all be made"
            )
    if o.dp_accountant == "prv" and o.dp_epsilon_budget is None and o.dp_target_epsilon is None:
        raise ValueError(
            "dp-accountant prv needs --dp-epsilon-budget or --dp-target-epsilon: its cost grows with the steps, "
            "and without a budget they never end (rdp's does not; docs/privacy.md)"
        )


def default_delta(samples: int) -> float:
    """1/(10 n) rounded down to a power of ten: n = 90 gives 1e-3, n = 100 gives 1e-3, n = 101 gives 1e-4."""
    if samples < 1:
        raise ValueError("differential privacy needs at least one local sample")
    return 10.0 ** -len(str(10 * samples - 1))  # 10n <= 10**digits(10n - 1): the power of ten at or above 10n


@dataclass(frozen=True)
class DPSettings:
    """What a node's DP-SGD runs with (all resolved: no option left to default)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    sample_rate: float  # q: each record is in a step's batch with this probability (Poisson sampling)
    expected_batch: int  # q * n: what the summed clipped gradients are divided by
    budget: float | None  # epsilon at which local training stops for good
    accountant: str
    secure_rng: bool

    def summary(self) -> str:
        budget = "none" if self.budget is None else f"{self.budget:g}"
        return (
            f"differential privacy: DP-SGD with noise multiplier {self.noise_multiplier:.4g}, clip norm "
            f"{self.max_grad_norm:g}, sample rate {self.sample_rate:.4g}, delta {self.delta:g}, epsilon budget "
            f"{budget}, {self.accountant} accountant{', secure RNG' if self.secure_rng else ''}"
        )


def settings(o: DPOptions, samples: int, batch_size: int) -> DPSettings | None:
    """The settings of a node with ``samples`` local training records (None without DP): q = batch/n
    (at most 1), delta defaulted from n, and the noise multiplier derived from ``--dp-target-epsilon``
    and ``--dp-steps`` with Opacus' ``get_noise_multiplier`` for the chosen accountant. ValueError, one
    line, when no noise multiplier reaches the target."""
    if not enabled(o):
        return None
    if samples < 1:
        raise ValueError("differential privacy: this node's shard has no training record, nothing to train on")
    q = min(1.0, batch_size / samples)
    delta = o.dp_delta if o.dp_delta is not None else default_delta(samples)
    sigma = o.dp_noise_multiplier
    if sigma is None:
        assert o.dp_target_epsilon is not None and o.dp_steps is not None
        from gossipfl.learning.accounting import PRV_MAX_STEPS, noise_for  # (imports Opacus: only with DP)

        if o.dp_accountant == "prv" and o.dp_steps > PRV_MAX_STEPS:
            raise ValueError(
                f"dp-accountant prv counts at most {PRV_MAX_STEPS} steps (its cost grows with them), --dp-steps "
                f"is {o.dp_steps}: use rdp (docs/privacy.md)"
            )
        try:
            sigma = noise_for(o.dp_target_epsilon, delta, q, o.dp_steps, o.dp_accountant)
        except ValueError:  # Opacus: "The privacy budget is too low." (a noise multiplier over 1e6 would be needed)
            raise ValueError(
                f"dp-target-epsilon {o.dp_target_epsilon}: no noise multiplier reaches it in {o.dp_steps} steps at "
                f"sample rate {q:.4g} (batch {batch_size} of {samples} records) with delta {delta:g}"
            ) from None
    budget = o.dp_epsilon_budget if o.dp_epsilon_budget is not None else o.dp_target_epsilon
    return DPSettings(
        noise_multiplier=float(sigma),
        max_grad_norm=o.dp_max_grad_norm if o.dp_max_grad_norm is not None else DEFAULT_MAX_GRAD_NORM,
        delta=delta,
        sample_rate=q,
        expected_batch=max(1, round(q * samples)),
        budget=budget,
        accountant=o.dp_accountant,
        secure_rng=o.dp_secure_rng,
    )


def check_node(o: DPOptions) -> str | None:
    """What a node (not a Learner built in-process, as benchmarks do) needs: a budget needs ``--state-dir``,
    where the write-ahead ledger keeps the steps spent across restarts (ValueError, one line). Returns a
    warning worth one line at start: DP without a budget and without a state directory counts from zero."""
    if (o.dp_epsilon_budget is not None or o.dp_target_epsilon is not None) and not o.state_dir:
        flag = "--dp-epsilon-budget" if o.dp_epsilon_budget is not None else "--dp-target-epsilon"
        raise ValueError(
            f"{flag} needs --state-dir: the steps spent are recorded there (privacy.json) before they are taken; "
            "without it every start would count from zero"
        )
    if enabled(o) and not o.state_dir:
        return (
            "differential privacy without --state-dir: the epsilon spent is not recorded and counts from zero at "
            "every start; give --state-dir (and --dp-epsilon-budget) to bound it across restarts"
        )
    return None


def describe_off() -> dict[str, Any]:
    """``/v1/status`` ``privacy`` of a node without DP: the same fields, ``enabled`` false, the rest null."""
    return {
        "enabled": False,
        "epsilon": None,
        "delta": None,
        "noise_multiplier": None,
        "max_grad_norm": None,
        "sample_rate": None,
        "steps": None,
        "budget": None,
        "budget_steps": None,
        "exhausted": False,
        "accountant": None,
        "secure_rng": False,
    }
