import pytest

from sflam_jax import config as config_lib

BAD = [
    ("seed", -1, "seed=-1"),
    ("algorithm", "fedsgd", "algorithm='fedsgd'"),
    ("num_rounds", 0, "num_rounds=0"),
    ("num_rounds", 2.5, "num_rounds=2.5"),
    ("data.source", "web", "data.source='web'"),
    ("data.num_clients", 0, "data.num_clients=0"),
    ("data.partition", "shards", "data.partition='shards'"),
    ("data.alpha", 0.0, "data.alpha=0.0"),
    ("data.std", (0.0,), "data.std"),
    ("model.preset", "huge", "model.preset='huge'"),
    ("model.cut_layer", 5, "model.cut_layer=5"),
    ("aqt.fwd_bits", 1, "aqt.fwd_bits=1"),
    ("aqt.bwd_bits", 17, "aqt.bwd_bits=17"),
    ("quant.up_bits", 0, "quant.up_bits=0"),
    ("quant.up_bits", 33, "quant.up_bits=33"),
    ("quant.down_bits", 40, "quant.down_bits=40"),
    ("train.clients_per_round", 51, "train.clients_per_round=51"),
    ("train.local_epochs", 0, "train.local_epochs=0"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("train.chunk_size", 11, "train.chunk_size=11"),
    ("optimizer.name", "lamb", "optimizer.name='lamb'"),
    ("optimizer.learning_rate", -0.1, "optimizer.learning_rate=-0.1"),
    ("optimizer.momentum", 1.0, "optimizer.momentum=1.0"),
    ("checkpoint.every", 0, "checkpoint.every=0"),
]


def test_base_config_is_valid():
    config_lib.validate(config_lib.base_config())


@pytest.mark.parametrize(("field", "value", "message"), BAD)
def test_bad_field_is_named(field, value, message):
    cfg = config_lib.base_config()
    *path, leaf = field.split(".")
    node = cfg
    for part in path:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(cfg)


def test_data_dependent_rules():
    cfg = config_lib.base_config()
    with pytest.raises(ValueError, match="model.patch_size=7"):
        config_lib.validate_data(cfg, (30, 30, 1), 60000)
    with pytest.raises(ValueError, match="data.mean"):
        cfg.data.mean, cfg.data.std = (0.5, 0.5), (0.5, 0.5)
        config_lib.validate_data(cfg, (28, 28, 3), 60000)
    cfg = config_lib.base_config()
    with pytest.raises(ValueError, match="data.num_clients=50"):
        config_lib.validate_data(cfg, (28, 28, 1), 40)
