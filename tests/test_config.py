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
    ("wireless.bandwidth_hz", -1e6, "wireless.bandwidth_hz=-1000000.0"),
    ("wireless.p_max_w", 0.0, "wireless.p_max_w=0.0"),
    ("wireless.min_distance_m", 300.0, "wireless.min_distance_m=300.0"),
    ("wireless.cpu_min_hz", 3e9, "wireless.cpu_min_hz=3000000000.0"),
    ("allocation.method", "greedy", "allocation.method='greedy'"),
    ("allocation.w_t", 0.0, "allocation.w_t=0.0"),
    ("allocation.w_e", 0.6, "must equal 1"),
    ("allocation.bits_min", 0, "allocation.bits_min=0"),
    ("allocation.bits_max", 40, "allocation.bits_max=40"),
    ("allocation.eps_q", 0.0, "allocation.eps_q=0.0"),
    ("data.min_client_samples", -1, "data.min_client_samples=-1"),
    ("data.image_size", -28, "data.image_size=-28"),
    ("model.patch_size", -4, "model.patch_size=-4"),
    ("model.layer_norm_eps", 0.0, "model.layer_norm_eps=0.0"),
    ("eval_every", -1, "eval_every=-1"),
    ("train.eval_batch_size", 0, "train.eval_batch_size=0"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay=-0.0001"),
    ("wireless.shadowing_std_db", -2.0, "wireless.shadowing_std_db=-2.0"),
    ("wireless.kappa", 0.0, "wireless.kappa=0.0"),
    ("allocation.pgd_steps", 0, "allocation.pgd_steps=0"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep=0"),
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


def test_at_least_25_bad_configs_are_covered():
    assert len(BAD) >= 25


@pytest.mark.parametrize(
    ("section", "leaf", "message"),
    [
        ("train", "lr", r"'train.lr' is not a config field"),
        (
            "train",
            "btach_size",
            r"'train.btach_size' is not a config field; did you mean "
            r"'train.batch_size'\?",
        ),
        ("optimizer", "learning_rte", r"did you mean 'optimizer.learning_rate'\?"),
        (None, "num_round", r"did you mean 'num_rounds'\?"),
    ],
)
def test_unknown_fields_are_rejected_with_the_nearest_name(section, leaf, message):
    cfg = config_lib.base_config()
    (cfg if section is None else cfg[section])[leaf] = 1
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(cfg)


def test_missing_field_is_named():
    cfg = config_lib.base_config()
    del cfg.train["chunk_size"]
    with pytest.raises(ValueError, match="no field 'train.chunk_size'"):
        config_lib.validate(cfg)


def test_partition_dependent_rules():
    cfg = config_lib.base_config()
    config_lib.validate_partition(cfg, [0, 32, 5])
    with pytest.raises(ValueError, match=r"train.batch_size=32 is invalid: exceeds the largest "):
        config_lib.validate_partition(cfg, [3, 31, 0])
    with pytest.raises(ValueError, match=r"data.num_clients=50 is invalid: leaves every client"):
        config_lib.validate_partition(cfg, [0, 0])


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


def _load(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["default", "tiny", "cifar10_vit_b32"])
def test_shipped_configs_are_valid(name):
    config_lib.validate(_load(name))


def test_paper_config_builds_vit_b32_at_224px():
    import jax

    from sflam_jax.models import split as split_lib
    from sflam_jax.models import vit

    cfg = _load("cifar10_vit_b32")
    assert (cfg.train.local_epochs, cfg.train.batch_size, cfg.data.num_clients) == (5, 128, 50)
    model_cfg = vit.vit_config(
        cfg.model.preset, image_size=cfg.data.image_size, channels=3, num_classes=10
    )
    shapes = jax.eval_shape(lambda k: vit.init_params(model_cfg, k), jax.random.key(0))
    params_c, _ = split_lib.split_params(shapes, cfg.model.cut_layer, model_cfg.depth)
    assert list(params_c) == ["embedding"]
    assert split_lib.split(model_cfg, 0).smashed_shape == (50, 768)
