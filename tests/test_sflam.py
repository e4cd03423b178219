"""The jitted, vmapped SFLAM round against a plain Python loop over clients (``oracles.py``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import B, E, assert_close_through_rounding, engine_of, oracle_round, setup

from sflam_jax.algorithms.base import Preprocess

CASES = [
    # (client sizes, cut, per-round bits, down bits, chunk): sizes are multiples of B when bits
    # < 32, so the oracle's unpadded batches draw the same rounding noise as the engine's.
    ([8, 16, 4, 12, 8], 0, [8, 8, 8], 32, 0),
    ([8, 16, 4, 12, 8], 1, [8, 8, 8], 32, 2),
    ([8, 16, 4, 12, 8], 1, [2, 32, 4], 4, 1),
    ([8, 16, 4, 12, 8], 1, [32, 32, 32], 4, 0),
    ([7, 13, 3, 10, 5], 1, [32, 32, 32], 32, 0),
    ([7, 13, 3, 10, 5], 0, [32, 32, 32], 32, 2),
    ([7, 13, 3, 10, 5], 2, [32, 32, 32], 32, 3),
]


@pytest.mark.parametrize(("sizes", "cut", "bits", "down_bits", "chunk"), CASES)
def test_round_matches_python_loop(sizes, cut, bits, down_bits, chunk):
    model, state, data, images, labels, parts = setup(sizes, cut)
    pre = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
    alg = engine_of(model, pre, down_bits=down_bits, chunk_size=chunk)
    key = jax.random.key(42)
    clients, ref_c, ref_s, ref_loss = oracle_round(
        model, state, images, labels, parts, key, 3, bits, down_bits, pre
    )
    new_state, metrics = jax.jit(alg.round)(state, data, key, jnp.asarray(bits, jnp.float32))
    np.testing.assert_array_equal(metrics["clients"], clients)
    got = (new_state.params_c, new_state.params_s, metrics["train_loss"])
    want = (ref_c, ref_s, ref_loss)
    if min(bits) == 32 and down_bits == 32:
        chex.assert_trees_all_close(got, want, atol=1e-5)
    else:

        def unquantized():
            float_round = jax.jit(engine_of(model, pre, chunk_size=chunk).round)
            floated, float_metrics = float_round(state, data, key, 32)
            return floated.params_c, floated.params_s, float_metrics["train_loss"]

        assert_close_through_rounding(got, want, unquantized, atol=1e-5)
    assert int(metrics["samples"]) == E * sum(sizes[c] for c in clients)
    assert int(new_state.round) == 1
    # The round really trained: the global model moved on both sides.
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params_s, state.params_s
    )
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_quantization_changes_the_result():
    model, state, data, *_ = setup([8, 16, 4, 12, 8], 0)
    pre = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
    alg = engine_of(model, pre)
    run = jax.jit(alg.round)
    s2, _ = run(state, data, jax.random.key(1), 2)
    s32, _ = run(state, data, jax.random.key(1), 32)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s2.params_c, s32.params_c)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_round_compiles_once_and_is_deterministic():
    model, state, data, *_ = setup([8, 16, 4, 12, 8], 1)
    pre = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
    alg = engine_of(model, pre, chunk_size=2)
    traced = chex.assert_max_traces(alg.round, n=1)
    run = jax.jit(traced, donate_argnums=0)
    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731
    a, _ = run(copy(state), data, jax.random.key(0), 8)
    b, _ = run(copy(state), data, jax.random.key(0), 8)
    c, _ = run(copy(a), data, jax.random.key(1), 8)
    chex.assert_trees_all_equal(a, b)
    assert int(c.round) == 2


def test_lane_queues_are_longest_first_onto_the_least_loaded_lane():
    model, *_ = setup([4], 0)
    eng = engine_of(model, Preprocess(mean=(0.5,), std=(0.5,), image_size=14))
    # B = 4, E = 2: tau = 2 * ceil(n / 4) = [2, 8, 0, 6, 4, 2] for these counts.
    queues = np.asarray(eng.lane_queues(jnp.array([4, 16, 0, 12, 8, 3]), 2))
    # 8 -> lane 0; 6 -> lane 1; 4 -> lane 1 (6 < 8); 2 -> lane 0 (8 < 10); 2 -> lane 0 (10 = 10);
    # the client without samples is queued nowhere.
    np.testing.assert_array_equal(queues[:, :3], [[1, 0, 5], [3, 4, -1]])
    assert (queues[:, 3:] == -1).all()


LANE_CASES = [
    # (client sizes, cut, bits, per round, lanes): very unequal clients, a client without samples,
    # a single client, more clients than lanes and lanes that run dry.
    ([4, 40, 0, 8, 28, 4, 12], 1, 32, 5, 2),
    ([4, 40, 0, 8, 28, 4, 12], 0, 8, 7, 3),
    ([4, 40, 0, 8, 28, 4, 12], 1, 4, 4, 1),
    ([36], 1, 32, 1, 0),
]


@pytest.mark.parametrize(("sizes", "cut", "bits", "per_round", "lanes"), LANE_CASES)
def test_lanes_match_python_loop_and_waste_less(sizes, cut, bits, per_round, lanes):
    """The lanes schedule equals the per-client Python loop (the oracle); it never computes more
    client steps than the chunks schedule and never fewer than the useful ones."""
    import dataclasses

    model, state, data, images, labels, parts = setup(sizes, cut)
    pre = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
    eng = engine_of(model, pre, per_round=per_round, chunk_size=lanes)
    key = jax.random.key(5)
    clients, ref_c, ref_s, ref_loss = oracle_round(
        model, state, images, labels, parts, key, per_round, [bits] * per_round, 32, pre
    )
    new, metrics = jax.jit(eng.round)(state, data, key, bits)
    np.testing.assert_array_equal(metrics["clients"], clients)
    got = (new.params_c, new.params_s, metrics["train_loss"])
    want = (ref_c, ref_s, ref_loss)
    if bits == 32:
        chex.assert_trees_all_close(got, want, atol=1e-5)
    else:

        def unquantized():
            floated, float_metrics = jax.jit(eng.round)(state, data, key, 32)
            return floated.params_c, floated.params_s, float_metrics["train_loss"]

        assert_close_through_rounding(got, want, unquantized, atol=1e-5)
    taus = [E * -(-sizes[k] // B) for k in clients]
    assert int(metrics["useful_client_steps"]) == sum(taus)
    assert np.asarray(metrics["health"]).all()
    chunked = dataclasses.replace(eng, schedule="chunks")
    _, chunk_metrics = jax.jit(chunked.round)(state, data, key, bits)
    useful, computed = int(metrics["useful_client_steps"]), int(metrics["computed_client_steps"])
    assert useful <= computed <= int(chunk_metrics["computed_client_steps"])
    # The lanes run until the most loaded one is done.
    width = eng.chunk
    assert computed % width == 0 and computed // width >= max(taus)


def test_auto_lanes_keep_the_useful_share():
    """``train.chunk_size = 0`` under lanes: equal clients use every lane; very unequal ones use
    fewer, and the chosen count meets the target share on the sampled rounds."""
    from sflam_jax.config import base_config
    from sflam_jax.experiment import choose_lanes

    model, *_ = setup([4], 0)
    cfg = base_config()
    cfg.train.clients_per_round = 6
    eng = engine_of(model, Preprocess(mean=(0.5,), std=(0.5,), image_size=14), per_round=6)
    assert choose_lanes(cfg, eng, [16] * 20) == 6
    sizes = [4] * 15 + [400] * 5
    lanes = choose_lanes(cfg, eng, sizes)
    assert 1 <= lanes < 6
    rng = np.random.default_rng(cfg.seed)
    counts = np.stack([np.asarray(sizes)[rng.choice(20, 6, replace=False)] for _ in range(32)])
    assert float(eng.useful_share(counts, lanes, 6)) >= cfg.train.min_useful_share
    # A hand check of the share: tau = 2 * [1, 1, 100], 2 lanes: loads 200 and 4.
    np.testing.assert_allclose(eng.useful_share(jnp.array([[4, 4, 400]]), 2, 3), 204 / 400)
