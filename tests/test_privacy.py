"""DP-SGD of local training (learning/privacy.py, accounting.py, dpsgd.py): the accountant against
Opacus' own, clipping and noise as they really happen, Poisson batches (empty ones too), and real nodes
that report the epsilon they spend, stop at their budget, keep it across a restart and refuse bad
options."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from gossipfl.config import ConfigError
from gossipfl.learning.accounting import Accountant
from gossipfl.learning.dpsgd import PrivateTraining, check_model
from gossipfl.learning.learner import Learner, build_seeded
from gossipfl.learning.privacy import BudgetSpent, DPSettings, PrivacyViolation, default_delta, settings
from gossipfl.learning.registry import get_task, load_checked
from gossipfl.learning.task import Dataset
from gossipfl.node import StartError

from .faults import NodeProcess
from .helpers import node_config, running, wait_for

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings(
        "ignore:Full backward hook is firing", "ignore:Secure RNG turned off", "ignore:Optimal order is the"
    ),
]
DIGITS = get_task("digits", None)
DATA = load_checked(DIGITS, 2026)
SHARD = ["--partition", "0/16"]  # about 90 records: q = 32/90, epsilon grows fast


def shard(n: int) -> Dataset:
    return DATA.train.subset(np.arange(n))


def dp(sigma=1.0, clip=1.0, q=1 / 3, batch=32, budget=None, accountant="rdp", secure=False, delta=1e-5):
    return DPSettings(sigma, clip, delta, q, batch, budget, accountant, secure)


def learner(settings: DPSettings | None, n=96, *, seed=0, lr=0.1, momentum=0.0, batch=32) -> Learner:
    engine = None if settings is None else PrivateTraining(settings, seed=seed)
    model = build_seeded(DIGITS.build_model, 7)
    return Learner(DIGITS, model, shard(n), DATA.test, seed=0, optimizer="sgd", lr=lr, momentum=momentum,
                   lr_decay_steps=0, batch_size=batch, privacy=engine)  # fmt: skip


def flat(lrn: Learner) -> np.ndarray:
    return np.concatenate([v.ravel() for v in lrn.snapshot().params.values()])


# -- the accountant ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_equals_opacus_privacy_engine_for_the_same_steps(mechanism):
    """Opacus' PrivacyEngine with Poisson sampling on a loader of 96 records in batches of 32 (q = 1/3)
    and our Learner on the same 96 records: the same history after 6 steps, the same epsilon."""
    steps, delta = 6, 1e-5
    x, y = torch.as_tensor(shard(96).x), torch.as_tensor(shard(96).y)
    model = DIGITS.build_model()
    engine = PrivacyEngine(accountant=mechanism)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True,
    )  # fmt: skip
    for _ in range(steps // len(loader)):  # (an empty Poisson batch is a step too: a loss of NaN, no gradient)
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    ours = learner(dp(accountant=mechanism, delta=delta))
    ours.train_steps(steps)
    assert ours.privacy.accountant.history == [tuple(r) for r in engine.accountant.history] == [(1.0, 1 / 3, steps)]
    assert ours.privacy.epsilon == engine.get_epsilon(delta) > 0


def test_rdp_epsilon_over_runs_and_the_steps_a_budget_allows():
    acc = Accountant("rdp", 1e-5)
    for sigma, q, n in [(1.0, 0.3, 3), (1.0, 0.3, 2), (2.0, 0.1, 4)]:
        for _ in range(n):
            acc.step(sigma, q)
    assert acc.history == [(1.0, 0.3, 5), (2.0, 0.1, 4)] and acc.steps == 9
    reference = RDPAccountant()
    reference.history = list(acc.history)
    assert acc.epsilon() == reference.get_epsilon(1e-5)
    k = acc.affordable(1.0, 0.3, budget=8.0)
    assert acc.epsilon((1.0, 0.3, k)) <= 8.0 < acc.epsilon((1.0, 0.3, k + 1)) and k >= 1
    prv = Accountant("prv", 1e-5, [(1.0, 0.3, 5)])
    reference = PRVAccountant()
    reference.history = [(1.0, 0.3, 5)]
    assert prv.epsilon() == reference.get_epsilon(1e-5) < acc.epsilon((1.0, 0.3, 0))  # PRV: tighter than RDP


def test_default_delta_is_a_power_of_ten_at_most_one_over_ten_n():
    assert [default_delta(n) for n in (1, 9, 90, 100, 101, 1437)] == [0.1, 0.01, 1e-3, 1e-3, 1e-4, 1e-5]


# -- clipping, noise, Poisson batches ---------------------------------------------------------------
def test_each_update_is_bounded_by_lr_times_the_clip_norm():
    """sigma = 0, q = 1 (every record in every batch), plain SGD: DP-SGD moves the model by at most lr * C a
    step, whatever the gradients; the same steps without DP move it far more."""
    lr, clip = 0.5, 1e-3
    private, plain = learner(dp(sigma=0.0, clip=clip, q=1.0, batch=96), lr=lr), learner(None, lr=lr, batch=96)
    for lrn in (private, plain):
        moves = []
        for _ in range(4):
            before = flat(lrn)
            lrn.train_steps(1)
            moves.append(np.linalg.norm(flat(lrn) - before))
        lrn.moves = moves
    assert max(private.moves) <= lr * clip * (1 + 1e-4) and min(private.moves) > 0
    assert min(plain.moves) > 20 * lr * clip


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_calibrated_scale_and_comes_from_the_engine_seed(secure):
    """q = 1 and sigma = 50: a step is the mean clipped gradient (norm <= C) plus Gaussian noise of std
    sigma * C / B per coordinate, so its norm is about lr * sigma * C * sqrt(d) / B."""
    lr, sigma, n = 1.0, 50.0, 96
    settings = dp(sigma=sigma, q=1.0, batch=n, secure=secure)
    runs = [learner(settings, seed=s, lr=lr, batch=n) for s in (1, 1, 2)]
    start = flat(runs[0])
    moves = []
    for lrn in runs:
        lrn.train_steps(1)
        moves.append(flat(lrn) - start)
    expected = lr * sigma * 1.0 * np.sqrt(start.size) / n
    for m in moves:
        assert 0.9 * expected < np.linalg.norm(m) < 1.1 * expected
    assert not np.array_equal(moves[0], moves[2])
    if secure:  # the OS CSPRNG: no seed makes two runs alike
        assert not np.array_equal(moves[0], moves[1])
        with pytest.raises(ValueError, match="optimizer.zero_grad"):  # Opacus' check: noised once
            runs[0].privacy._optimizer.add_noise()
    else:
        np.testing.assert_array_equal(moves[0], moves[1])


def test_empty_poisson_batches_take_a_noise_step_that_the_accountant_counts():
    lrn = learner(dp(q=0.01, batch=1), seed=0)  # about 1 record a batch: some empty, some not
    sizes = []
    real = lrn.privacy.batch
    lrn.privacy.batch = lambda n: sizes.append(len(b := real(n))) or b
    for _ in range(10):
        before = flat(lrn)
        lrn.train_steps(1)
        assert not np.array_equal(flat(lrn), before)  # noise alone moves the model
    assert 0 < sizes.count(0) < 10 and lrn.privacy.accountant.history == [(1.0, 0.01, 10)] and lrn.steps == 10
    assert lrn.privacy.spent == (10, Accountant("rdp", 1e-5, [(1.0, 0.01, 10)]).epsilon())


def test_model_keys_stay_raw_and_batchnorm_is_refused():
    private, plain = learner(dp()), learner(None)
    private.train_steps(2)
    assert list(private.model.state_dict()) == list(plain.model.state_dict())
    assert list(private.snapshot().params) == list(plain.snapshot().params)
    assert list(private.served_state()[0]) == list(plain.served_state()[0]) == ["1.weight", "1.bias", "3.weight",
                                                                                 "3.bias"]  # fmt: skip
    with pytest.raises(ValueError, match="^differential privacy: this model cannot be trained with DP-SGD: Batch"):
        check_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))


def test_the_record_travels_with_the_model_and_a_spent_budget_is_refused():
    a = learner(dp(budget=50.0))
    a.train_steps(5)
    saved = a.save()
    assert saved.privacy["history"] == [[1.0, 1 / 3, 5]] and saved.privacy["epsilon_steps"] == 5
    b = learner(dp(budget=50.0))
    b.load(saved)
    assert b.privacy.spent == a.privacy.spent and b.privacy.accountant.steps == 5
    b.train_steps(2)
    assert b.privacy.accountant.history == [(1.0, 1 / 3, 7)]
    plain = learner(None)
    with pytest.raises(ValueError, match="trained without differential privacy"):
        learner(dp()).load(plain.save())
    with pytest.raises(BudgetSpent, match="privacy budget already spent"):
        learner(dp(budget=a.privacy.epsilon)).load(saved)  # at the budget: not one more step


# -- nodes ------------------------------------------------------------------------------------------
def privacy_metrics(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if "privacy" in s.name}


async def test_a_node_reports_a_growing_epsilon_in_status_and_metrics(make_config, http):
    cfg = make_config(partition="0/16", join_wait=0, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, dp_delta=1e-5)
    async with running(cfg) as (node,):
        assert await wait_for(lambda: node.learner.privacy.spent[0] >= 4, 20)
        async with http.get(node.url + "/v1/status") as r:
            first = (await r.json())["privacy"]
        assert await wait_for(lambda: node.learner.privacy.spent[0] > first["steps"] + 4, 20)
        async with http.get(node.url + "/v1/status") as r:
            status = await r.json()
        async with http.get(node.url + "/metrics") as r:
            metrics = privacy_metrics(await r.text())
    p = status["privacy"]
    assert 0 < first["epsilon"] < p["epsilon"] and p["steps"] > first["steps"]
    assert {k: p[k] for k in ("enabled", "delta", "noise_multiplier", "max_grad_norm", "accountant", "budget")} == {
        "enabled": True, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "rdp",
        "budget": None,
    }  # fmt: skip
    reference = RDPAccountant()  # a fresh accountant fed the node's history gives the node's epsilon
    reference.history = [(1.0, p["sample_rate"], p["steps"])]
    assert p["epsilon"] == reference.get_epsilon(1e-5) and p["sample_rate"] == 32 / status["samples"]
    assert metrics["gossipfl_privacy_epsilon"] >= p["epsilon"] and metrics["gossipfl_privacy_budget_exhausted"] == 0
    assert status["class_histogram"] is None and status["metrics"]["train_loss"] is None  # not released under DP


async def test_the_budget_stops_training_for_good_and_the_node_serves_and_merges(make_config, http, tmp_path):
    budget = Accountant("rdp", 1e-3).epsilon((1.0, 32 / 90, 9)) + 1e-9  # 9 steps: a partial last round
    private_cfg = dict(partition="0/16", join_wait=0, dp_noise_multiplier=1.0, dp_epsilon_budget=budget)
    private_cfg.update(state_dir=str(tmp_path))
    async with (
        running(make_config(no_train=True, partition="1/16")) as (other,),
        running(make_config(**private_cfg, seeds=(f"127.0.0.1:{other.port}",))) as (node,),
    ):
        assert await wait_for(lambda: node.learner.privacy.exhausted, 20)
        steps, merges = node.learner.steps, node.learner.merges
        assert await wait_for(lambda: node.learner.merges >= merges + 2, 20)  # gossip goes on
        async with http.get(node.url + "/v1/status") as r:
            status = await r.json()
        async with http.get(node.url + "/metrics") as r:
            metrics = privacy_metrics(await r.text())
        async with http.get(node.url + "/v1/model") as r:
            assert r.status == 200
    p = status["privacy"]
    assert p["exhausted"] is True and status["training"] is False and node.learner.steps == steps == 9
    assert p["steps"] == p["budget_steps"] == 9 and p["epsilon"] <= budget and p["epsilon"] > budget - 1e-6
    assert metrics["gossipfl_privacy_budget_exhausted"] == 1 and metrics["gossipfl_privacy_epsilon"] == p["epsilon"]


async def test_a_restart_keeps_the_spent_epsilon_and_a_spent_budget_stops_the_start(make_config, tmp_path):
    dp_opts = dict(partition="0/16", join_wait=0, dp_noise_multiplier=1.0, state_dir=str(tmp_path), id="dp-node")
    async with running(make_config(**dp_opts)) as (node,):
        assert await wait_for(lambda: node.learner.privacy.spent[0] >= 6, 20)
    steps, epsilon = node.learner.privacy.spent
    doc = json.loads((tmp_path / "dp-node" / "state.json").read_text())
    assert doc["privacy"]["history"] == [[1.0, 32 / 90, steps]] and doc["privacy"]["epsilon"] == epsilon
    async with running(make_config(**dp_opts, train_interval=3600)) as (again,):
        assert again.resumed is not None and again.resumed.steps == steps
        assert await wait_for(lambda: again.learner.privacy.spent[0] > steps, 10)  # one round of 2 steps, then none
        assert again.learner.privacy.accountant.history == [(1.0, 32 / 90, steps + 2)]  # continued, not reset
        assert again.learner.privacy.spent[0] == steps + 2 and again.learner.privacy.epsilon > epsilon
    with pytest.raises(StartError, match="privacy budget already spent"):
        async with running(make_config(**dp_opts, dp_epsilon_budget=epsilon)):
            pass
    # the same as a process: one line, exit 2; the checkpoint is kept, not set aside
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "node", "--host", "127.0.0.1", "--port", "0", "--discovery", "static",
         "--partition", "0/16", "--id", "dp-node", "--state-dir", str(tmp_path), "--dp-noise-multiplier", "1",
         "--dp-epsilon-budget", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "GOSSIPFL_CLUSTER": node.config.cluster},
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "privacy budget already spent" in lines[0], r.stderr
    assert not list((tmp_path / "dp-node").glob("aside-*"))


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"dp_noise_multiplier": 0.0}, "dp-noise-multiplier 0.0: must be a number > 0"),
        ({"dp_noise_multiplier": 1.0, "dp_max_grad_norm": -1.0}, "dp-max-grad-norm -1.0: must be a number > 0"),
        ({"dp_noise_multiplier": 1.0, "dp_delta": 1.0}, "dp-delta 1.0: must be in (0, 1)"),
        ({"dp_noise_multiplier": 1.0, "dp_delta": 0.0}, "dp-delta 0.0: must be in (0, 1)"),
        ({"dp_target_epsilon": 4.0}, "--dp-target-epsilon and --dp-steps go together"),
        ({"dp_target_epsilon": 4.0, "dp_steps": 10, "dp_noise_multiplier": 1.0}, "not both"),
        ({"dp_noise_multiplier": 1.0, "no_train": True}, "--no-train has none"),
        ({"dp_epsilon_budget": 4.0}, "--dp-epsilon-budget needs --dp-noise-multiplier or --dp-target-epsilon"),
        ({"dp_secure_rng": True}, "--dp-secure-rng needs"),
        ({"dp_noise_multiplier": 1.0, "dp_accountant": "gdp"}, "dp-accountant 'gdp': expected rdp or prv"),
        ({"dp_noise_multiplier": 1.0, "dp_accountant": "prv"}, "prv needs --dp-epsilon-budget"),
        ({"dp_target_epsilon": 8.0, "dp_steps": 10, "dp_epsilon_budget": 4.0}, "below dp-target-epsilon"),
        ({"dp_noise_multiplier": 1.0, "dp_epsilon_budget": float("inf")}, "dp-epsilon-budget inf"),
    ],
)
def test_bad_options_are_one_line_configuration_errors(options, fragment):
    with pytest.raises(ConfigError) as e:
        node_config(**options)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_options_from_the_command_line_exit_2_with_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "gossipfl", "node", "--dp-noise-multiplier", "1", "--dp-delta", "2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "dp-delta 2.0: must be in (0, 1)" in lines[0], r.stderr


async def test_what_only_the_local_data_decides_is_checked_at_start(make_config, tmp_path):
    unreachable = make_config(
        partition="0/16", join_wait=0, dp_target_epsilon=1e-9, dp_steps=1000, state_dir=str(tmp_path)
    )
    with pytest.raises(StartError, match="dp-target-epsilon 1e-09: no noise multiplier reaches it in 1000 steps"):
        async with running(unreachable):
            pass

    class BatchNormDigits(type(DIGITS)):
        def build_model(self):
            return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    with pytest.raises(StartError, match="cannot be trained with DP-SGD: BatchNorm cannot support"):
        async with running(make_config(join_wait=0, dp_noise_multiplier=1.0), task=BatchNormDigits()):
            pass
    planned = make_config(
        partition="0/16", join_wait=0, dp_target_epsilon=4.0, dp_steps=40, train_interval=3600, state_dir=str(tmp_path)
    )
    async with running(planned) as (node,):
        s = node.learner.privacy.settings
        assert s.budget == 4.0 and s.delta == 1e-3  # 90 records: 1/(10 n) rounded down
        assert 3.96 <= Accountant("rdp", 1e-3).epsilon((s.noise_multiplier, s.sample_rate, 40)) <= 4.0


# -- the write-ahead ledger, and what a start refuses -----------------------------------------------
def test_a_sigkill_loses_no_step_from_the_count(make_config, tmp_path):
    """No checkpoint is ever written (interval 1 h): the steps a node had taken when killed with SIGKILL are all
    in its ledger, so its restart counts at least the epsilon it showed before the kill."""
    args = ["--id", "dp-kill", "--discovery", "static", "--state-dir", str(tmp_path), "--partition", "0/16",
            "--join-wait", "0", "--checkpoint-interval", "3600", "--dp-noise-multiplier", "1"]  # fmt: skip
    n = NodeProcess([*args, "--dp-delta", "1e-5"], str(tmp_path / "node.log"))
    try:
        n.wait_up()
        deadline = time.monotonic() + 30
        while (shown := n.status()["privacy"])["steps"] < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(n.proc.pid, signal.SIGKILL)
        n.proc.wait()
    finally:
        n.close()
    assert shown["steps"] >= 20 and not (tmp_path / "dp-kill" / "state.json").exists()
    ledger = json.loads((tmp_path / "dp-kill" / "privacy.json").read_text())
    [entry] = ledger["shards"].values()
    assert entry["steps"] >= shown["steps"] and entry["partition"] == "0/16", entry
    reference = RDPAccountant()
    reference.history = [tuple(run) for run in entry["history"]]
    assert reference.get_epsilon(1e-5) >= shown["epsilon"]


async def test_the_ledger_outlives_a_checkpoint_set_aside_and_refuses_when_unreadable(make_config, tmp_path):
    dp_opts = dict(partition="0/16", join_wait=0, dp_noise_multiplier=1.0, state_dir=str(tmp_path), id="dp-node")
    async with running(make_config(**dp_opts)) as (node,):
        assert await wait_for(lambda: node.learner.privacy.spent[0] >= 6, 20)
    steps = node.learner.privacy.accountant.steps
    ledger = tmp_path / "dp-node" / "privacy.json"
    [entry] = json.loads(ledger.read_text())["shards"].values()
    assert entry["steps"] == steps  # a clean stop writes back the steps taken, not those reserved
    # another optimizer: the checkpoint is set aside, the count is not
    async with running(make_config(**dp_opts, optimizer="adam", train_interval=3600)) as (again,):
        assert again.checkpoints.set_aside is not None and again.resumed is None
        assert again.learner.privacy.accountant.steps >= steps  # the ledger's
        assert await wait_for(lambda: again.learner.privacy.accountant.steps >= steps + 2, 10)  # then one round
    for garbage in (b"{not json", b'{"format": 2}'):
        ledger.write_bytes(garbage)
        with pytest.raises(StartError, match="privacy ledger .* is unreadable .* delete it on purpose") as e:
            async with running(make_config(**dp_opts)):
                pass
        assert "\n" not in str(e.value)
    ledger.unlink()  # a deliberate reset: the count restarts from the checkpoint's record (zero without one)
    async with running(make_config(**dp_opts, optimizer="adam", train_interval=3600)) as (reset,):
        assert reset.resumed is not None and reset.learner.privacy.spent == again.learner.privacy.spent


async def test_a_start_refuses_a_budget_without_a_state_dir_or_that_allows_no_step(make_config, tmp_path):
    with pytest.raises(StartError, match="^--dp-epsilon-budget needs --state-dir: the steps spent are recorded"):
        async with running(make_config(partition="0/16", dp_noise_multiplier=1.0, dp_epsilon_budget=8.0)):
            pass
    with pytest.raises(StartError, match="^--dp-target-epsilon needs --state-dir"):
        async with running(make_config(partition="0/16", dp_target_epsilon=8.0, dp_steps=10)):
            pass
    tiny = make_config(partition="0/16", dp_noise_multiplier=1.0, dp_epsilon_budget=0.1, state_dir=str(tmp_path))
    with pytest.raises(StartError, match="^privacy budget allows no step: 0 DP-SGD steps recorded") as e:
        async with running(tiny):
            pass
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^differential privacy: this node's shard has no training record"):
        settings(node_config(dp_target_epsilon=8.0, dp_steps=100, state_dir=str(tmp_path)), 0, 32)


class OwnOptimizerDigits(type(DIGITS)):
    """A task whose train_step trains with an optimizer of its own: no clipping, no noise."""

    def train_step(self, model, optimizer, x, y):
        own = torch.optim.SGD(model.parameters(), lr=0.5)
        own.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        own.step()
        return loss.item()


class Leaky(nn.Module):
    """A layer whose forward keeps a statistic of the batch in a float buffer (which would be gossiped)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(64))

    def forward(self, x):
        if self.training:
            self.mean.copy_(x.mean(0).detach())
        return x


class LeakyDigits(type(DIGITS)):
    def build_model(self):
        return nn.Sequential(Leaky(), nn.Linear(64, 10))


def test_a_step_that_bypasses_dp_sgd_is_undone_and_stops_training():
    for task, what in ((OwnOptimizerDigits(), "made 0 steps of the DP optimizer"), (LeakyDigits(), "buffer")):
        engine = PrivateTraining(dp(), seed=0)
        lrn = Learner(task, build_seeded(task.build_model, 7), shard(96), DATA.test, seed=0, optimizer="sgd",
                      lr=0.1, batch_size=32, privacy=engine)  # fmt: skip
        before = lrn.served_state()[0]
        with pytest.raises(PrivacyViolation, match=what):
            lrn.train_steps(1)
        after = lrn.snapshot().params
        assert all(np.array_equal(before[k], after[k]) for k in after)  # the non-private step is undone
        assert engine.allowed(2) == 0 and lrn.train_steps(2) is None and lrn.steps == 0  # for good


async def test_a_node_whose_task_bypasses_dp_sgd_fails(make_config):
    cfg = make_config(partition="0/16", join_wait=0, dp_noise_multiplier=1.0)
    async with running(cfg, task=OwnOptimizerDigits()) as (node,):
        assert await wait_for(lambda: node.failure is not None, 10)
    assert "not exactly one" in node.failure and node.exit_code == 1


def test_prv_is_bracketed_by_rdp_and_refused_past_its_step_cap():
    acc = Accountant("prv", 1e-5)
    rdp_k = acc.rdp_affordable(1.0, 0.05, 2.0)
    k = acc.affordable(1.0, 0.05, 2.0)
    assert k > rdp_k > 0 and acc.epsilon((1.0, 0.05, k)) <= 2.0  # PRV, tighter, allows more steps (here 12, not 6)
    with pytest.raises(ValueError, match="prv counts at most 10000 steps"):  # (not Opacus' search: minutes, GBs)
        settings(node_config(dp_target_epsilon=8.0, dp_steps=20_000, dp_accountant="prv"), 90, 32)
    engine = PrivateTraining(dp(sigma=5.0, q=0.01, budget=50.0, accountant="prv"), seed=0)
    with pytest.raises(ValueError, match="dp-accountant prv: the budget allows .* use --dp-accountant rdp"):
        engine.check_start()
