import pytest

from sflam_jax import config as config_lib
from sflam_jax import validation
from sflam_jax.errors import ConfigError

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
    ("eval_from", -1, "eval_from=-1"),
    ("lora.rank", -1, "lora.rank=-1"),
    ("lora.alpha", 0.0, "lora.alpha=0.0"),
    ("lora.segments", "edge", "lora.segments='edge'"),
    ("lora.base_bits", 2, "lora.base_bits=2"),
    ("lora.aggregation", "mean", "lora.aggregation='mean'"),
    ("lora.targets", "query[", "is not a valid regex"),
    ("lora.targets", "", "lora.targets=''"),
    ("train.eval_batch_size", 0, "train.eval_batch_size=0"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay=-0.0001"),
    ("wireless.shadowing_std_db", -2.0, "wireless.shadowing_std_db=-2.0"),
    ("wireless.kappa", 0.0, "wireless.kappa=0.0"),
    ("allocation.pgd_steps", 0, "allocation.pgd_steps=0"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep=0"),
    ("train.schedule", "greedy", "train.schedule='greedy'"),
    ("train.min_useful_share", 1.5, "train.min_useful_share=1.5"),
    ("data.test_samples", -5, "data.test_samples=-5"),
    ("optimizer.head_lr_scale", 0.0, "optimizer.head_lr_scale=0.0"),
    ("model.random_init", True, "model.random_init=True is invalid: needs model.pretrained"),
]


def test_base_config_is_valid():
    validation.validate(config_lib.base_config())


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
        validation.validate(cfg)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"algorithm": "sfl", "allocation.method": "pgd"},
            r"allocation.method='pgd' is invalid: allowed: 'equal'",
        ),
        (
            {"algorithm": "sl", "train.stream": True},
            r"algorithm='sl' is invalid: train.stream .* "
            r"\('sflam', 'sfl', 'fl', 'sfprompt', 'esfl'\)",
        ),
        (
            {"algorithm": "sfl_v2", "distributed.enabled": True},
            r"algorithm='sfl_v2' is invalid",
        ),
    ],
)
def test_protocol_rules_come_from_the_registry(fields, message):
    cfg = config_lib.base_config()
    for field, value in fields.items():
        section, _, leaf = field.rpartition(".")
        (cfg[section] if section else cfg)[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validation.validate(cfg)


def test_system_defaults_are_the_spec_constants():
    """The wireless and allocation defaults are SPEC's constants (sections 3 and 4), typed here
    from the spec, not read from the library."""
    cfg = config_lib.base_config()
    spec = {
        "radius_m": 250.0,
        "min_distance_m": 10.0,
        "shadowing_std_db": 8.0,
        "noise_dbm_per_hz": -174.0,
        "bandwidth_hz": 20e6,
        "p_max_w": 0.2,
        "server_power_w": 1.0,
        "cpu_min_hz": 0.5e9,
        "cpu_max_hz": 2.0e9,
        "flops_per_cycle": 16.0,
        "kappa": 1e-28,
        "server_flops": 100e12,
    }
    assert dict(cfg.wireless) == spec
    assert (cfg.allocation.bits_min, cfg.allocation.bits_max) == (2, 16)
    assert cfg.allocation.w_t > 0 and cfg.allocation.w_t + cfg.allocation.w_e == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config.train.clent_per_round=3"],
            "sflam_jax: --config.train.clent_per_round: 'train.clent_per_round' is not a config "
            "field; did you mean --config.train.clients_per_round?",
        ),
        (["--config.train.batch_size=abc"], "sflam_jax: flag --config.train.batch_size=abc: "),
        (["--config.train.batch_size=0"], "sflam_jax: train.batch_size=0 is invalid: "),
        (["--nope=1"], "sflam_jax: Unknown command line flag 'nope'"),
    ],
)
def test_bad_command_line_is_one_line(args, message, tmp_path):
    """Each bad input ends in one ``sflam_jax: ...`` line on stderr and exit status 1."""
    import os
    import subprocess
    import sys

    from conftest import CLI_ENV, ROOT

    config = os.path.join(ROOT, "configs", "tiny.py")
    command = [sys.executable, "-m", "sflam_jax.main", f"--config={config}"]
    proc = subprocess.run(
        [*command, f"--workdir={tmp_path}", *args], env=CLI_ENV, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert not os.listdir(tmp_path)


def test_missing_config_file_is_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import CLI_ENV

    missing = str(tmp_path / "nope.py")
    for flag in ([f"--config={missing}"], ["--config", missing]):
        proc = subprocess.run(
            [sys.executable, "-m", "sflam_jax.main", *flag, f"--workdir={tmp_path}"],
            env=CLI_ENV,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1
        assert proc.stderr == f"sflam_jax: --config={missing!r}: no such config file " + (
            "(see configs/ for the experiments)\n"
        )


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
    with pytest.raises(ConfigError, match=message):
        validation.validate(cfg)


def test_missing_field_is_named():
    cfg = config_lib.base_config()
    del cfg.train["chunk_size"]
    with pytest.raises(ValueError, match="no field 'train.chunk_size'"):
        validation.validate(cfg)


def test_partition_dependent_rules():
    cfg = config_lib.base_config()
    validation.validate_partition(cfg, [0, 32, 5])
    with pytest.raises(ValueError, match=r"train.batch_size=32 is invalid: exceeds the largest "):
        validation.validate_partition(cfg, [3, 31, 0])
    with pytest.raises(ValueError, match=r"data.num_clients=50 is invalid: leaves every client"):
        validation.validate_partition(cfg, [0, 0])


def test_data_dependent_rules():
    cfg = config_lib.base_config()
    with pytest.raises(ValueError, match="model.patch_size=7"):
        validation.validate_data(cfg, (30, 30, 1), 60000)
    with pytest.raises(ValueError, match="data.mean"):
        cfg.data.mean, cfg.data.std = (0.5, 0.5), (0.5, 0.5)
        validation.validate_data(cfg, (28, 28, 3), 60000)
    cfg = config_lib.base_config()
    with pytest.raises(ValueError, match="data.num_clients=50"):
        validation.validate_data(cfg, (28, 28, 1), 40)


def _load(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["default", "tiny", "cifar10_vit_b32", "fmnist_dinov2_s14"])
def test_shipped_configs_are_valid(name):
    validation.validate(_load(name))


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


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_head_lr_scale_steps_only_the_classifier_faster(name):
    """Two steps on a server segment: with head_lr_scale = 10 the body moves exactly as with 1 and
    the classifier as it would at ten times the learning rate (SGD: ten times as far)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sflam_jax.algorithms.base import make_optimizer

    params = {
        "block_1": {"mlp_in": {"kernel": jnp.ones((3, 2))}},
        "head": {"classifier": {"kernel": jnp.ones((2, 4))}, "norm": {"scale": jnp.ones(2)}},
    }
    grads = jax.tree.map(lambda x: jnp.linspace(-1.0, 2.0, x.size).reshape(x.shape), params)

    def after_two_steps(opt_cfg):
        tx = make_optimizer(opt_cfg)
        p, state = params, tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return p

    cfg = config_lib.base_config().optimizer
    cfg.name = name
    base = after_two_steps(cfg)
    cfg.head_lr_scale = 10.0
    scaled = after_two_steps(cfg)
    cfg.head_lr_scale, cfg.learning_rate = 1.0, cfg.learning_rate * 10
    fast = after_two_steps(cfg)
    np.testing.assert_array_equal(
        scaled["block_1"]["mlp_in"]["kernel"], base["block_1"]["mlp_in"]["kernel"]
    )
    np.testing.assert_array_equal(scaled["head"]["norm"]["scale"], base["head"]["norm"]["scale"])
    np.testing.assert_allclose(
        scaled["head"]["classifier"]["kernel"],
        fast["head"]["classifier"]["kernel"],
        rtol=1e-6,
        atol=1e-6,  # Adam moves a weight of 1 to ~1e-5: a float32 ulp of the start (1.2e-7)
    )
    assert not np.allclose(
        scaled["head"]["classifier"]["kernel"], base["head"]["classifier"]["kernel"]
    )


def test_lora_on_a_protocol_without_adapters_is_named():
    cfg = config_lib.base_config()
    cfg.algorithm, cfg.lora.rank = "fl", 4
    with pytest.raises(ValueError, match="lora.rank=4 is invalid: must be 0 with algorithm='fl'"):
        validation.validate(cfg)


def test_lora_targets_that_name_no_layer_of_a_segment_are_named(tiny_config):
    from sflam_jax import experiment

    cfg = tiny_config
    cfg.lora.rank, cfg.lora.targets = 4, "no_such_layer"
    with pytest.raises(ValueError, match="lora.targets='no_such_layer' names no dense layer"):
        experiment.build_experiment(cfg)
