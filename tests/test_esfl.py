"""ESFL: per-device cuts in one compiled round (SPEC section 6.2)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import (
    LR,
    MOMENTUM,
    B,
    E,
    assert_close_through_rounding,
    fedavg,
    oracle_client,
    setup,
)

from sflam_jax import experiment, train
from sflam_jax.algorithms import esfl
from sflam_jax.algorithms.base import Preprocess
from sflam_jax.engine import Engine
from sflam_jax.errors import ConfigError
from sflam_jax.metrics import read_jsonl
from sflam_jax.models import split as split_lib
from sflam_jax.models import vit
from sflam_jax.validation import validate

PRE = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
CFG = vit.vit_config("tiny", image_size=14, channels=1, num_classes=3, patch_size=7)


def _round(sizes, cuts, bits, down_bits=32, chunk=0, seed=0, schedule="lanes"):
    """One ESFL round of 3 sampled clients at the given cuts (no planner): the plan, the
    engine's ``(params_c, params_s, stats [3], health [3, S])`` and the setup."""
    _, state, data, images, labels, parts = setup(sizes, 1, seed)
    model = split_lib.VariableCut(CFG, 1)
    opt = optax.sgd(LR, momentum=MOMENTUM)
    alg = esfl.PerDeviceCuts(model, opt, PRE, E, B, down_bits=down_bits)
    engine = Engine(alg, 3, chunk_size=chunk, schedule=schedule)
    key = jax.random.key(42)
    plan, _ = engine.round_plan(data.counts, key, jnp.asarray(bits, jnp.float32))
    plan["cuts"] = jnp.asarray(cuts, jnp.int32)
    new, metrics = jax.jit(engine.train_plan)(state, data, plan)
    n = metrics["samples"]
    stats = jnp.stack([metrics["train_loss"] * n, metrics["train_accuracy"] * n, n])
    result = (new.params_c, new.params_s, stats, metrics["health"])
    return plan, result, (state, images, labels, parts, key)


@pytest.mark.parametrize(
    ("sizes", "cuts", "bits", "down_bits", "chunk", "schedule"),
    [
        # sizes are multiples of B with quantized traffic (the oracle's batches are unpadded)
        ([8, 16, 4, 12, 8], [0, 2, 1], [4, 8, 6], 8, 2, "lanes"),
        ([7, 13, 3, 10, 5], [2, 0, 1], [32, 32, 32], 32, 0, "lanes"),
        ([7, 13, 3, 10, 5], [1, 2, 0], [32, 32, 32], 32, 2, "chunks"),
    ],
)
def test_mixed_cuts_equal_split_training_at_each_clients_cut(
    sizes, cuts, bits, down_bits, chunk, schedule
):
    """The round with mixed cuts, on the engine's lanes or chunks, is a plain loop of SFL-V1
    clients, each split at its own cut (explicit vjp through the quantized link, two optimizers),
    then FedAvg of full models."""
    plan, (params_c, params_s, stats, health), setup = _round(
        sizes, cuts, bits, down_bits, chunk, schedule=schedule
    )
    state, images, labels, parts, key = setup
    whole = split_lib.merge_params(state.params_c, state.params_s)
    train_key = jax.random.split(key)[1]
    width = -(-max(sizes) // B) * B
    finals, counts, loss = [], [], 0.0
    for i, k in enumerate(np.asarray(plan["clients"])):
        pc, ps = split_lib.split_params(whole, cuts[i], CFG.depth)
        pc, ps, _, total = oracle_client(
            split_lib.split(CFG, cuts[i]),
            pc,
            ps,
            jax.tree.map(jnp.zeros_like, ps),
            images,
            labels,
            parts[k],
            jax.random.fold_in(train_key, int(k)),
            width,
            bits[i],
            down_bits,
            PRE,
        )
        finals.append(split_lib.merge_params(pc, ps))
        counts.append(len(parts[k]))
        loss += total
    expected = (fedavg(counts, finals), loss / (E * sum(counts)))
    got = (split_lib.merge_params(params_c, params_s), stats[0] / stats[2])
    if min(bits) == 32 and down_bits == 32:
        chex.assert_trees_all_close(got, expected, atol=5e-5)
    else:

        def unquantized():
            _, (float_c, float_s, stats, _), _ = _round(sizes, cuts, [32] * 3, 32, chunk)
            return split_lib.merge_params(float_c, float_s), stats[0] / stats[2]

        assert_close_through_rounding(got, expected, unquantized, atol=5e-5)
    assert bool(np.all(health))


def test_float_training_does_not_depend_on_the_cuts():
    sizes = [7, 13, 3, 10, 5]
    _, first, _ = _round(sizes, [0, 1, 2], [32, 32, 32])
    _, second, _ = _round(sizes, [2, 2, 0], [32, 32, 32])
    for a, b in zip(first[:3], second[:3], strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    # ...while quantized traffic at the cut makes them differ.
    _, third, _ = _round(sizes, [2, 2, 0], [4, 4, 4])
    assert not np.allclose(third[2], second[2])


def test_cut_workload_follows_the_cut(tiny_config):
    cfg = tiny_config
    cfg.algorithm, cfg.allocation.method = "esfl", "esfl_exact"
    planner = experiment.planner_for(cfg, (14, 14, 1), 4)
    w = planner.workload
    assert w.cuts == (0, 1, 2)
    assert np.all(np.diff(w.cut_client_flops) > 0) and np.all(np.diff(w.cut_server_flops) < 0)
    assert np.all(np.diff(w.cut_client_params) > 0) and np.all(np.diff(w.cut_memory_bytes) > 0)
    # A block moves from the server to the device: the FLOPs are conserved (up to how XLA fuses
    # the elementwise work at the segments' ends, 0.3% here).
    total = np.add(w.cut_client_flops, w.cut_server_flops)
    np.testing.assert_allclose(total, total[0], rtol=1e-2)
    # The config's cut is the comparison protocols' workload.
    at = w.cuts.index(cfg.model.cut_layer)
    assert w.client_flops == w.cut_client_flops[at]
    assert w.client_params == w.cut_client_params[at]


@pytest.mark.parametrize(
    ("method", "free_bits"),
    [("esfl_exact", False), ("esfl_ao", False), ("joint", False), ("joint", True)],
)
def test_trains_through_the_trainer_at_the_chosen_cuts(tiny_config, tmp_path, method, free_bits):
    cfg = tiny_config
    cfg.algorithm, cfg.allocation.method, cfg.num_rounds = "esfl", method, 2
    cfg.allocation.optimize_bits = free_bits
    cfg.allocation.pgd_steps = 100
    record = train.train_and_evaluate(cfg, str(tmp_path))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))[1:]
    assert 0 <= record["cut_min"] <= record["cut_mean"] <= record["cut_max"] <= 2
    assert record["memory_infeasible_device"] == -1
    np.testing.assert_allclose(
        record["sim_time_s"], sum(r["round_latency_s"] for r in rows), rtol=1e-6
    )
    if method != "joint":  # ESFL minimises the round time; the joint problem weighs energy too
        assert record["round_latency_s"] <= record["sfl_round_latency_s"] * (1 + 1e-6)
    if free_bits:  # the joint solver's bits meet the learning budget
        assert record["quant_error"] <= cfg.allocation.eps_q * (1 + 1e-6)
    else:  # every device at the config's bits, whichever solver
        for row in rows:
            assert row["bits_min"] == row["bits_max"] == cfg.quant.up_bits


def test_a_device_no_cut_fits_is_reported_not_a_crash(tiny_config, tmp_path, capsys):
    cfg = tiny_config
    cfg.algorithm, cfg.allocation.method, cfg.num_rounds = "esfl", "esfl_exact", 1
    cfg.esfl.memory_min_bytes = cfg.esfl.memory_max_bytes = 1000.0
    record = train.train_and_evaluate(cfg, str(tmp_path))
    assert record["memory_infeasible_device"] == 0
    assert record["cut_max"] == 0  # everyone at the least-memory cut
    client = record["clients"][0]
    assert f"the memory of client {client} fits no candidate cut" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cuts", (0, 3), r"esfl.cuts=\(0, 3\) is invalid: 3 is not a cut layer"),
        ("cuts", (), r"esfl.cuts=\(\) is invalid: the candidate set is empty"),
        ("cuts", (0, 2), r"esfl.cuts=\(0, 2\) is invalid: it must include model.cut_layer=1"),
        ("memory_min_bytes", 0.0, r"esfl.memory_min_bytes=0.0 is invalid"),
        ("memory_min_bytes", 2.0**31, r"must be <= esfl.memory_max_bytes"),
        ("alternations", 0, r"esfl.alternations=0 is invalid"),
    ],
)
def test_bad_esfl_fields_are_named(tiny_config, field, value, message):
    cfg = tiny_config
    cfg.algorithm, cfg.allocation.method = "esfl", "esfl_ao"
    cfg.esfl[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_only_joint_chooses_bits(tiny_config):
    cfg = tiny_config
    cfg.algorithm, cfg.allocation.method = "esfl", "esfl_exact"
    cfg.allocation.optimize_bits = True
    with pytest.raises(ConfigError, match="allocation.optimize_bits=True is invalid with "):
        validate(cfg)
    cfg.allocation.method = "joint"
    validate(cfg)


def test_esfl_names_its_allocators(tiny_config):
    cfg = tiny_config
    cfg.algorithm, cfg.allocation.method = "esfl", "pgd"
    with pytest.raises(ConfigError, match="allocation.method='pgd'.*'esfl_ao', 'joint'"):
        validate(cfg)


def test_device_blocks_use_the_device_matmuls_at_every_cut():
    """With AQT on the device segment, the whole-model forward at cut l is the split model's at l
    (integer matmuls on the embedding and blocks [0, l), float after)."""
    from sflam_jax import quant

    aqt = quant.aqt_dot_general_cls(8, None)  # deterministic forward
    params = vit.init_params(CFG, jax.random.key(3))
    model = split_lib.VariableCut(CFG, 1, client_dot_general_cls=aqt)
    x = PRE(jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 14, 14, 1)), jnp.uint8))
    key = jax.random.key(0)  # AQT asks for one; a forward without stochastic rounding ignores it
    floats = split_lib.VariableCut(CFG, 1).apply(params, x, 0, lambda a: a)
    for cut in range(CFG.depth + 1):
        reference = split_lib.split(CFG, cut, client_dot_general_cls=aqt)
        pc, ps = split_lib.split_params(params, cut, CFG.depth)
        expected = reference.server_apply(ps, reference.client_apply(pc, x, key), key)
        got = model.apply(params, x, cut, lambda a: a, key)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert not np.allclose(got, floats, atol=1e-6)  # the integer matmuls are in use
