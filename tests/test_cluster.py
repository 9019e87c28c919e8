"""Three real nodes on loopback (own zeroconf each, real HTTP, real training) converge together."""

import pytest

from gossipfl.learning.learner import Learner, build_seeded
from gossipfl.learning.tasks.digits import DigitsTask
from gossipfl.protocol.consensus import consensus_distance, flatten

from .helpers import params_of, running, spread, wait_for
from .test_gossip import initial_params


def initial_accuracy(seed):
    task = DigitsTask()
    data = task.load_data(2026)
    return Learner(task, build_seeded(task.build_model, seed), data.train, data.test, seed=seed).evaluate().accuracy


pytestmark = pytest.mark.timeout(120)


async def test_three_training_nodes_learn_and_agree(make_config):
    n = 3
    # distinct initial models (the default is one shared model), so agreeing is gossip's doing
    configs = [make_config(seed=i, init_seed=i, partition=f"{i}/{n}", discovery=("mdns",)) for i in range(n)]
    spread0 = consensus_distance([flatten(initial_params(i)) for i in range(n)])
    assert max(initial_accuracy(i) for i in range(n)) < 0.3  # untrained models are near chance
    async with running(*configs) as nodes:
        assert await wait_for(lambda: all(len(x.peers) == n - 1 for x in nodes), timeout=20)

        def accuracies():
            return [x.last_eval.accuracy if x.last_eval else 0.0 for x in nodes]

        learned = await wait_for(lambda: min(accuracies()) >= 0.9, timeout=90, interval=0.5)
        accs = accuracies()
        assert learned, accs
        assert all(x.gossiper.stats.ok > 0 for x in nodes)
        assert spread(nodes) < spread0 / 5
        assert max(accs) - min(accs) <= 0.05
        for x in nodes:  # each trained only on its own third of the data
            assert x.learner.train_size == 479
            assert x.learner.age > 0
            assert params_of(x).keys() == initial_params(0).keys()
