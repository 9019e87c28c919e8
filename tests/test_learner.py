import numpy as np
import pytest
import torch

from gossipfl.learning.learner import Learner, build_seeded, make_optimizer, resolve_device
from gossipfl.learning.tasks.digits import DigitsTask


@pytest.fixture(scope="module")
def data():
    return DigitsTask().load_data(2026)


def learner(data, **kw):
    return Learner(DigitsTask(), build_seeded(DigitsTask().build_model, 0), data.train, data.test, seed=0, **kw)


def test_training_lowers_the_loss_and_counts_age(data):
    lr = learner(data)
    before = lr.evaluate()
    lr.train_steps(200)
    after = lr.evaluate()
    assert after.loss < before.loss and after.accuracy > before.accuracy + 0.5
    assert lr.age == 200 and lr.version == 200


def test_same_seed_same_training(data):
    a, b = learner(data), learner(data)
    a.train_steps(20)
    b.train_steps(20)
    for k, v in a.snapshot().params.items():
        np.testing.assert_array_equal(v, b.snapshot().params[k])


def test_build_seeded_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_seeded(DigitsTask().build_model, 7)
    assert torch.equal(torch.rand(3), expected)


def test_update_hands_fn_the_model_itself_and_sets_what_it_returns(data):
    """``update(fn)``: fn sees the model's own CPU tensors (no copy of a large model); what it returns is
    set, atomically, whether new arrays or those same tensors changed in place."""
    lr = learner(data)
    before = lr.snapshot()
    seen = {}

    def to_zeros(s):
        seen.update((k, v.copy()) for k, v in s.params.items())
        assert all(np.shares_memory(s.params[k], t.detach().numpy()) for k, t in lr._named.items())
        return {k: np.zeros_like(v) for k, v in s.params.items()}, s.age + 5, 2.5

    assert lr.update(to_zeros) is None
    for k in before.params:
        np.testing.assert_array_equal(seen[k], before.params[k])
        assert not lr.snapshot().params[k].any()
    assert lr.age == 5 and lr.weight == 2.5 and lr.version == before.version + 1
    assert lr.evaluate().accuracy == pytest.approx(np.mean(data.test.y == 0), abs=1e-6)  # all-zero model: class 0

    def add_one_in_place(s):
        for v in s.params.values():
            v += 1
        return dict(s.params), s.age, s.weight

    lr.update(add_one_in_place)
    assert all((v == 1).all() for v in lr.snapshot().params.values())
    assert lr.merges == 2


def test_snapshots_are_copies(data):
    lr = learner(data)
    snap = lr.snapshot()
    snap.params["1.bias"][:] = 99.0
    assert not np.any(lr.snapshot().params["1.bias"] == 99.0)


def test_step_size_decay(data):
    const = learner(data, lr=0.01)
    assert const.lr_at(0) == const.lr_at(10_000) == 0.01
    decayed = learner(data, lr=0.01, lr_decay_steps=100)
    assert decayed.lr_at(0) == 0.01 and decayed.lr_at(100) == pytest.approx(0.005)
    decayed.train_steps(100)
    assert decayed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / (1 + 99 / 100))
    # the schedule follows the node's own steps: a merge that brings a huge age leaves it alone
    decayed.update(lambda s: (s.params, 2**53, s.weight))
    decayed.train_steps(1)
    assert decayed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / (1 + 100 / 100))
    assert decayed.age == 2**53  # and the age saturates at the wire's bound instead of overflowing it


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adam", params, lr=0.1, momentum=0.9), torch.optim.Adam)
    sgd = make_optimizer("sgd", params, lr=0.1, momentum=0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", params, lr=0.1, momentum=0.0)


def test_resolve_device():
    assert resolve_device("auto", cuda_devices=0) == "cpu"
    assert resolve_device("auto", cuda_devices=1) == "cuda"
    assert resolve_device("cpu", cuda_devices=2) == "cpu"
    assert resolve_device("cuda:1", cuda_devices=2) == "cuda:1"
    with pytest.raises(ValueError, match="device cuda: not available, found no CUDA device"):
        resolve_device("cuda", cuda_devices=0)
    with pytest.raises(ValueError, match="device cuda:2: not available, found 2 CUDA device"):
        resolve_device("cuda:2", cuda_devices=2)
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu", cuda_devices=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_the_cpu_interface(data):
    gpu = learner(data, device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    before = gpu.evaluate()
    gpu.train_steps(200)
    after = gpu.evaluate()
    assert after.accuracy > before.accuracy + 0.5
    snap = gpu.snapshot()  # parameters leave the learner as CPU numpy arrays
    assert all(isinstance(v, np.ndarray) for v in snap.params.values())
    gpu.update(lambda s: ({k: np.zeros_like(v) for k, v in s.params.items()}, s.age, s.weight))
    assert all(float(p.abs().sum()) == 0.0 for p in gpu.model.parameters())


def test_served_model_is_the_last_merge_until_it_goes_stale(data):
    lr = learner(data, lr=0.05, publish_after_steps=10)
    merged = {k: v + 0.01 for k, v in lr.snapshot().params.items()}
    lr.update(lambda s: (merged, s.age, s.weight))

    def served() -> dict:
        return {n: p.detach().numpy().copy() for n, p in lr.serving.named_parameters()}

    lr.train_steps(10)  # within the allowance: evaluate() scores the merged model, not the working copy
    lr.evaluate()
    assert all(np.array_equal(served()[k], merged[k]) for k in merged)
    assert lr.unpublished_steps == 10 and lr.served_age == 0
    assert lr.evaluate_working() != lr.evaluate()

    lr.train_steps(1)  # one step too many without a merge (a node alone): the working copy is served
    lr.evaluate()
    work = lr.snapshot().params
    assert all(np.array_equal(served()[k], work[k]) for k in work)
    assert lr.unpublished_steps == 0 and lr.served_age == 11


def test_publish_after_zero_serves_the_working_copy(data):
    lr = learner(data)
    lr.train_steps(3)
    assert lr.evaluate() == lr.evaluate_working()


def test_a_step_with_a_non_finite_loss_restores_the_last_merged_model(data):
    from gossipfl.learning.learner import Diverged

    lr = learner(data, optimizer="sgd", lr=0.1)
    lr.train_steps(5)
    lr.update(lambda s: (s.params, s.age, s.weight))  # a merge: the served model is this one
    merged = lr.snapshot().params
    lr.train_steps(3)
    assert lr.optimizer.state  # momentum buffers exist
    real_step = lr.task.train_step
    lr.task = type("Exploding", (), {"train_step": lambda self, *a: float("nan"), "evaluate": None})()
    with pytest.raises(Diverged, match="loss nan at step 8: restored the model of the last merge"):
        lr.train_steps(2)
    for k, v in lr.snapshot().params.items():
        np.testing.assert_array_equal(v, merged[k])
    assert not lr.optimizer.state and lr.steps == 8
    lr.task = type("Back", (), {"train_step": staticmethod(real_step)})()
    lr.train_steps(1)
    assert lr.steps == 9


def test_readiness_is_read_without_the_lock(data):
    lr = learner(data, publish_after_steps=2)
    with lr._lock:  # as while a long evaluation runs in another thread
        assert lr.trained is False
    lr.train_steps(3)
    with lr._lock:
        assert lr.trained is True  # more local steps than publish_after_steps: the next read publishes


def test_gossiped_state_is_parameters_and_float_buffers():
    from torch import nn

    from gossipfl.learning.learner import gossiped_tensors

    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    names = set(gossiped_tensors(model))
    assert names == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
