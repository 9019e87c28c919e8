import pytest

from gossipfl.config import ConfigError, NodeConfig, load_config


def test_defaults():
    c = load_config({}, env={})
    assert c == NodeConfig()
    assert (c.gossip_interval, c.task, c.shard, c.discovery) == (0.25, "digits", (0, 1), ("mdns",))


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('port = 9000\nseed = 5\ngossip-interval = 2.5\nseeds = ["a:1", "b:2"]\nno_train = true\n')
    env = {"GOSSIPFL_SEED": "6", "GOSSIPFL_LR": "0.01", "GOSSIPFL_MDNS_INTERFACE": "127.0.0.1,127.0.0.2"}
    c = load_config({"seed": "7"}, env=env, config_file=f)
    assert c.seed == 7  # cli beats env and file
    assert c.lr == 0.01  # env beats default
    assert c.port == 9000 and c.gossip_interval == 2.5 and c.no_train is True  # file
    assert c.seeds == ("a:1", "b:2")
    assert c.mdns_interface == ("127.0.0.1", "127.0.0.2")
    assert c.batch_size == 32  # default
    assert load_config({}, env=env, config_file=f).seed == 6  # env beats file


def test_config_file_from_env_and_node_table(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[node]\nid = 'alpha'\n")
    assert load_config({}, env={"GOSSIPFL_CONFIG": str(f)}).id == "alpha"


@pytest.mark.parametrize(
    ("cli", "env", "fragment"),
    [
        ({"partition": "3/3"}, {}, "0 <= K < N"),
        ({"partition": "1-3"}, {}, "expected K/N"),
        ({"port": "70000"}, {}, "port 70000"),
        ({"port": "eighty"}, {}, "cannot read 'eighty' as int"),
        ({}, {"GOSSIPFL_GOSSIP_INTERVAL": "fast"}, "GOSSIPFL_GOSSIP_INTERVAL"),
        ({}, {"GOSSIPFL_NO_TRAIN": "maybe"}, "as bool"),
        ({}, {"GOSSIPFL_PORT": "tcp://10.96.0.7:8470"}, "Kubernetes service link"),  # a Service named gossipfl
        ({"gossip_interval": "0"}, {}, "gossip-interval must be > 0"),
        ({"checkpoint_interval": "0"}, {}, "checkpoint-interval must be > 0"),
        ({"join_wait": "-1"}, {}, "join-wait must be >= 0"),
        ({"seeds": "hostonly"}, {}, "expected host:port"),
        ({"seeds": "h:0"}, {}, "expected host:port"),
        ({"mdns_interface": "eth0"}, {}, "expected an IPv4 address"),
        ({"id": "bad id!"}, {}, "id 'bad id!'"),
        ({"id": "x" * 64}, {}, "1-63 characters"),
        ({"discovery": "mdns,carrier-pigeon"}, {}, "unknown backend"),
        ({"log_format": "xml"}, {}, "text or json"),
        ({"cluster": "a b"}, {}, "cluster 'a b'"),
        ({"merge": "median"}, {}, "merge 'median'"),
        ({"partition_scheme": "shards:0"}, {}, "S must be a positive integer"),
        ({"optimizer": "lbfgs"}, {}, "optimizer 'lbfgs'"),
        ({"eval_split": "train"}, {}, "eval-split 'train'"),
        ({"momentum": "1.5"}, {}, "momentum must be in"),
        ({"device": "gpu"}, {}, "device 'gpu'"),
    ],
)
def test_bad_values_name_the_problem(cli, env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(cli, env=env)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_config({}, env={}, config_file=tmp_path / "missing.toml")
    f = tmp_path / "bad.toml"
    f.write_text("port = [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config({}, env={}, config_file=f)
    f.write_text("colour = 'blue'")
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        load_config({}, env={}, config_file=f)
