"""Checkpoints (``--state-dir``): the format, atomic writes, resuming a Learner exactly, and real node
processes stopped with SIGTERM or killed with SIGKILL and started again; checkpoints that cannot be used
(corrupt, truncated, another task or cluster) are moved aside and the node starts fresh."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import urllib.request

import numpy as np
import pytest

from gossipfl import state
from gossipfl.common import atomic
from gossipfl.discovery.peers import PeerTable
from gossipfl.learning.checkpoint import CheckpointError, decode, dumps, encode, loads
from gossipfl.learning.learner import Learner, build_seeded
from gossipfl.learning.tasks.digits import DigitsTask
from gossipfl.protocol import wire
from gossipfl.protocol.ledger import COMMITTED, Ledger
from gossipfl.protocol.robust import RobustMerge

from .faults import NodeProcess
from .helpers import message, running, wait_for

LOG = logging.LoggerAdapter(logging.getLogger("test"), {})


def learner(optimizer: str = "sgd", seed: int = 1) -> Learner:
    task = DigitsTask()
    data = task.load_data(2026)
    model = build_seeded(task.build_model, 7)
    return Learner(task, model, data.train.subset(np.arange(300)), data.test, seed=seed, optimizer=optimizer, lr=0.05)


def state_of(lr: Learner) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in lr.model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_resumed_learner_continues_exactly_as_if_never_stopped(optimizer):
    """Model, optimizer state (momentum, Adam's moments and step) and minibatch order all come back: the
    steps after a resume are the very steps the original makes."""
    a = learner(optimizer)
    a.train_steps(13)  # mid-epoch: 13 * 32 of 300 samples crosses an epoch boundary too
    blob, doc = encode(a.save(), {"node_id": "x"})
    b = learner(optimizer, seed=99)  # another minibatch seed: the saved order and generator must win
    b.load(decode(blob, loads(dumps(doc))))
    assert (b.age, b.steps, b.weight) == (a.age, a.steps, a.weight) and b.trained
    a.train_steps(7)
    b.train_steps(7)
    for k, v in state_of(a).items():
        np.testing.assert_array_equal(state_of(b)[k], v, err_msg=k)


def test_an_optimizer_state_of_another_kind_changes_nothing():
    """SGD's momentum loaded into Adam: refused before anything changes (it would fail every step after)."""
    a, b = learner("sgd"), learner("adam")
    a.train_steps(3)
    before = state_of(b)
    with pytest.raises(ValueError, match="optimizer or minibatch state does not fit"):
        b.load(a.save())
    assert all(np.array_equal(state_of(b)[k], v) for k, v in before.items()) and b.age == 0
    b.train_steps(2)  # and it still trains


def test_overlapping_writes_leave_one_whole_checkpoint(tmp_path, monkeypatch):
    """A periodic write that outlives its loop at stop and the last write at stop: one at a time."""
    import threading
    import time

    a = learner()
    a.train_steps(2)
    c = checkpointer(tmp_path)
    real_fsync = atomic.os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (time.sleep(0.1), real_fsync(fd)))
    first = a.save()
    a.train_steps(1)
    second = a.save()
    threads = [threading.Thread(target=c.write, args=(s, v, extras())) for s, v in ((first, 2), (second, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(p.name for p in c.dir.iterdir())
    assert names == ["lock", "state.json", "tensors-2.safetensors"], names
    c.close()
    assert checkpointer(tmp_path).resume(learner(), None, ledger(), 0.0) is not None


def test_a_checkpoint_that_does_not_fit_changes_nothing():
    a, b = learner(), learner()
    a.train_steps(3)
    saved = a.save()
    before = state_of(b)
    wrong = dict(saved.model)
    name = next(k for k, v in wrong.items() if v.ndim == 2)
    wrong[name] = wrong[name][:, :10]
    bad_shape = type(saved)(**{**saved.__dict__, "model": wrong})
    with pytest.raises(ValueError, match="saved shape"):
        b.load(bad_shape)
    bad_order = type(saved)(**{**saved.__dict__, "order": np.arange(5)})
    with pytest.raises(ValueError, match="another shard"):
        b.load(bad_order)
    assert all(np.array_equal(state_of(b)[k], v) for k, v in before.items()) and b.age == 0


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda blob, doc: (blob[: len(blob) // 2], doc), "digest"),
        (lambda blob, doc: (blob[:-1] + bytes([blob[-1] ^ 1]), doc), "digest"),
        (lambda blob, doc: (blob, {**doc, "learner": {**doc["learner"], "age": -1}}), "from 0 to 2"),
        (lambda blob, doc: (blob, {**doc, "learner": {**doc["learner"], "steps": 2**60}}), "from 0 to 2"),
        (lambda blob, doc: (blob, {**doc, "learner": {}}), "incomplete"),
        (lambda blob, doc: (b"\0" * 8, {**doc, "tensors_sha256": __import__("hashlib").sha256(b"\0" * 8).hexdigest()}),
         "incomplete"),
    ],
)  # fmt: skip
def test_damaged_checkpoints_are_refused_with_the_reason(damage, reason):
    a = learner()
    a.train_steps(2)
    blob, doc = damage(*encode(a.save(), {}))
    with pytest.raises(CheckpointError, match=reason):
        decode(blob, doc)


def test_the_json_half_is_checked_too():
    for data, reason in [(b"{not json", "not JSON"), (b"[1]", "not a JSON object"), (b'{"format": 9}', "format 9")]:
        with pytest.raises(CheckpointError, match=reason):
            loads(data)


def ledger() -> Ledger:
    return Ledger(max_prepared=4, prepare_ttl=5)


def extras(peers=None, robust=None, book=None) -> dict:
    return state.extras(peers or PeerTable("n1"), robust, book if book is not None else ledger(), 100.0)


def checkpointer(tmp_path, node_id="n1", **expect) -> state.Checkpointer:
    ident = {"node_id": node_id, "task": "digits", "model": "m1", "cluster": "c", "split": "s", "optimizer": "sgd"}
    ident |= expect
    c = state.Checkpointer(tmp_path, ident, LOG, 1.0)
    c.open()
    return c


def test_save_and_resume_through_the_directory_with_peers_and_robust_state(tmp_path):
    a, robust = learner(), RobustMerge("auto")
    a.train_steps(4)
    robust.restore({"latest": {"p1": 0.5, "p2": 0.25}, "clipped": 3, "refused": 1})
    peers = PeerTable("n1")
    peers.upsert("p1", "http://10.0.0.1:8470", "digits", "mdns")
    book = ledger()
    for i, xid in enumerate(["a" * 32, "b" * 32, "c" * 32]):
        book.prepare(xid, "p1", None, None, now=90.0 + i)
        book.decide(xid, COMMITTED if i != 1 else "aborted", now=90.0 + i)
    c = checkpointer(tmp_path)
    assert c.save(a, extras(peers, robust, book)) and not c.save(a, extras(peers, robust, book))  # unchanged
    a.train_steps(1)
    assert c.save(a, extras(peers, robust, book))
    assert sorted(p.name for p in c.dir.iterdir()) == ["lock", "state.json", "tensors-2.safetensors"]
    assert c.dir.stat().st_mode & 0o777 == 0o700  # a model can reveal its training data: this user only
    assert all((c.dir / f).stat().st_mode & 0o777 == 0o600 for f in ("state.json", "tensors-2.safetensors"))
    c.close()
    b, robust2, book2 = learner(), RobustMerge("auto"), ledger()
    c2 = checkpointer(tmp_path)
    resumed = c2.resume(b, robust2, book2, 5000.0)
    assert resumed is not None and resumed.age == 5 and resumed.peer_urls == ("http://10.0.0.1:8470",)
    assert robust2.export() == robust.export() and b.age == 5
    # committed outcomes come back, aged by the time the node was down (here: a fraction of a second)
    assert book2.outcome("a" * 32) == COMMITTED and book2.outcome("c" * 32) == COMMITTED
    assert book2.outcome("b" * 32) is None  # an abort is the answer to any unknown xid anyway
    assert [x for x, _ in book2.committed(5000.0)] == ["a" * 32, "c" * 32]
    assert [round(ago) for _, ago in book2.committed(5000.0)] == [10, 8]
    assert c2.describe()["resumed"] and c2.describe()["resumed_from"]["age"] == 5


def test_a_second_node_cannot_take_a_directory_in_use(tmp_path):
    c = checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="in use by another running node"):
        checkpointer(tmp_path)
    c.close()
    checkpointer(tmp_path).close()  # released


@pytest.mark.parametrize(
    "expect, reason",
    [
        ({"task": "synthetic"}, "task 'digits'"),
        ({"cluster": "other"}, "cluster 'c'"),
        ({"model": "m2"}, "model"),
        ({"optimizer": "adam"}, "optimizer 'sgd'"),  # Adam's state is not SGD's
    ],
)
def test_a_checkpoint_of_another_task_model_or_cluster_is_moved_aside(tmp_path, caplog, expect, reason):
    a = learner()
    a.train_steps(2)
    c = checkpointer(tmp_path)
    c.save(a, extras())
    c.close()
    b = learner()
    c2 = checkpointer(tmp_path, **expect)
    with caplog.at_level(logging.WARNING):
        assert c2.resume(b, None, ledger(), 0.0) is None
    assert b.age == 0 and not (c2.dir / "state.json").exists()
    aside = list(c2.dir.glob("aside-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["state.json", "tensors-1.safetensors"]
    lines = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0] and str(aside[0]) in lines[0]
    assert c2.describe()["set_aside"] == str(aside[0])


def test_a_crash_in_the_middle_of_a_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    a = learner()
    a.train_steps(2)
    c = checkpointer(tmp_path)
    c.save(a, extras())
    a.train_steps(2)
    real = atomic.os.replace
    calls = []

    def crash_on_the_json(src, dst):
        calls.append(os.path.basename(dst))
        if str(dst).endswith("state.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_the_json)
    assert not c.save(a, extras()) and c.last_error == "No space left on device"
    monkeypatch.setattr(atomic.os, "replace", real)
    assert calls == ["tensors-2.safetensors", "state.json"]
    assert sorted(p.name for p in c.dir.iterdir()) == ["lock", "state.json", "tensors-1.safetensors"]
    c.close()
    b = learner()
    assert checkpointer(tmp_path).resume(b, None, ledger(), 0.0) is not None and b.age == 2  # the previous one


def node_args(tmp_path, *extra: str) -> list[str]:
    return ["--id", "ckpt", "--discovery", "static", "--state-dir", str(tmp_path / "state"), "--eval-interval",
            "0.3", "--train-interval", "0.05", *extra]  # fmt: skip


def test_sigterm_then_start_again_resumes_age_steps_and_model(tmp_path):
    """The done-when of the issue: a node with --state-dir, trained, stopped with SIGTERM and started again
    reports an age at least as large as before the stop, and says it resumed and from when."""
    n = NodeProcess(node_args(tmp_path), str(tmp_path / "1.log"))
    try:
        n.wait_up()
        assert wait_for_sync(lambda: n.status()["age"] >= 40, 30)
        before = n.status()
        assert before["checkpoint"]["resumed"] is False
        assert n.terminate()[0] == 0
    finally:
        n.close()
    saved = json.loads((tmp_path / "state" / "ckpt" / "state.json").read_text())
    assert saved["learner"]["age"] >= before["age"]
    m = NodeProcess(node_args(tmp_path), str(tmp_path / "2.log"), port=n.port)
    try:
        after = m.wait_up()
        assert after["age"] >= before["age"] and after["steps"] >= before["steps"]
        cp = after["checkpoint"]
        assert cp["resumed"] is True and cp["resumed_from"]["age"] == saved["learner"]["age"]
        assert cp["resumed_from"]["saved_at"].endswith("Z") and after["join"]["state"] == "skipped"
        # it did not retrain from scratch: its first evaluation is as good as the model it stopped with
        assert wait_for_sync(lambda: m.status()["metrics"]["accuracy"] is not None, 10)
        assert m.status()["metrics"]["accuracy"] >= before["metrics"]["accuracy"] - 0.05
    finally:
        m.close()
    assert "resumed from the checkpoint of" in open(tmp_path / "2.log").read()


def test_sigkill_then_start_again_resumes_from_the_last_periodic_checkpoint(tmp_path):
    n = NodeProcess(node_args(tmp_path, "--checkpoint-interval", "0.3"), str(tmp_path / "1.log"))
    try:
        n.wait_up()
        assert wait_for_sync(lambda: n.status()["checkpoint"]["saves"] >= 3 and n.status()["age"] > 20, 30)
        with urllib.request.urlopen(n.url + "/metrics", timeout=5) as r:
            metrics = r.read().decode()
        written = re.search(r"^gossipfl_checkpoints_written_total\S* (\S+)$", metrics, re.M)
        assert written and float(written.group(1)) >= 3 and "gossipfl_last_checkpoint_timestamp_seconds" in metrics
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait(10)
    finally:
        n.close()
    saved_age = json.loads((tmp_path / "state" / "ckpt" / "state.json").read_text())["learner"]["age"]
    m = NodeProcess(node_args(tmp_path), str(tmp_path / "2.log"), port=n.port)
    try:
        s = m.wait_up()
        assert s["checkpoint"]["resumed"] and s["checkpoint"]["resumed_from"]["age"] == saved_age > 20
    finally:
        m.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage-json", "missing-tensors"])
async def test_a_node_moves_a_broken_checkpoint_aside_and_starts_fresh(make_config, tmp_path, caplog, damage):
    cfg = make_config(id="broken", state_dir=str(tmp_path), train_interval=0.02)
    async with running(cfg) as (n,):
        assert await wait_for(lambda: n.learner.age > 10, 30)
    d = tmp_path / "broken"
    tensors = next(d.glob("tensors-*.safetensors"))
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "garbage-json":
        (d / "state.json").write_bytes(b"\x00\xff{")
    else:
        tensors.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        async with running(cfg) as (m,):
            s = m.status()
            assert s["checkpoint"]["resumed"] is False and s["checkpoint"]["set_aside"] is not None
            assert s["age"] < 10  # fresh (a few steps may have been made already)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("not used" in line for line in lines) == 1 and any("starting fresh" in line for line in lines)
    assert not any(r.exc_info for r in caplog.records)
    assert len(list(d.glob("aside-*"))) == 1


def test_a_node_whose_state_dir_is_in_use_exits_with_one_line(tmp_path):
    n = NodeProcess(node_args(tmp_path), str(tmp_path / "1.log"))
    try:
        n.wait_up()
        second = NodeProcess(node_args(tmp_path), str(tmp_path / "2.log"))
        assert second.proc.wait(60) == 2
        second.close()
        lines = open(tmp_path / "2.log").read().strip().splitlines()
        assert lines == [
            f"gossipfl: error: state-dir {tmp_path}/state/ckpt is in use by another running node (same --id?)"
        ]
    finally:
        n.close()


async def test_a_resumed_node_calls_its_peers_again_and_keeps_its_push_sum_weight(make_config, tmp_path):
    """The peer table and the merge rule's state (push-sum weight) are in the checkpoint: a node started
    again with no seeds finds its old partner at once, with the weight it stopped with."""
    common = dict(merge="pushsum", no_train=True, partition_scheme="dirichlet:0.5")  # shards of unequal sizes
    async with running(make_config(id="ps-a", gossip_interval=0.1, partition="0/2", **common)) as (a,):
        seed = (f"127.0.0.1:{a.port}",)
        cfg_b = make_config(id="ps-b", seeds=seed, state_dir=str(tmp_path), gossip_interval=0.1, partition="1/2",
                            **common)  # fmt: skip
        async with running(cfg_b) as (b,):
            assert await wait_for(lambda: b.learner.merges >= 3, 20)
        weight, merges = b.learner.weight, b.learner.merges  # after stop: nothing changes them any more
        assert weight != b.learner.train_size
        # slow gossip: it starts no exchange for seconds, and a knows it only at its old address
        again = make_config(id="ps-b", state_dir=str(tmp_path), gossip_interval=5, partition="1/2", **common)
        async with running(again) as (b2,):
            assert (b2.learner.weight, b2.learner.merges) == (weight, merges)
            assert await wait_for(lambda: b2.peers.get("ps-a") is not None, 10)
            assert b2.peers.get("ps-a").source == "checkpoint"


def wait_for_sync(predicate, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


async def test_a_commit_is_still_known_after_a_restart(make_config, tmp_path, http):
    """Exactly-once across a restart: an initiator in doubt about an exchange this node committed before it
    stopped asks again and is told "committed", not "aborted" (which would leave the two halves apart)."""
    cfg = make_config(id="xo", no_train=True, state_dir=str(tmp_path))
    async with running(cfg) as (n,):
        body = message(n, sender="initiator")
        xid = wire.decode(body, n.gossiper.spec).xid
        async with http.post(n.url + "/v1/gossip", data=body) as r:
            assert r.status == 200
        async with http.post(f"{n.url}/v1/gossip/{xid}/commit") as r:
            assert (await r.json())["outcome"] == COMMITTED
    async with running(cfg) as (again,):
        assert again.status()["checkpoint"]["resumed"]
        async with http.post(f"{again.url}/v1/gossip/{xid}/commit") as r:
            assert (await r.json())["outcome"] == COMMITTED
        async with http.post(f"{again.url}/v1/gossip/{'f' * 32}/commit") as r:
            assert (await r.json())["outcome"] == "aborted"  # never prepared here
