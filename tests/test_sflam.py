"""The jitted, vmapped SFLAM round against a plain Python loop over clients (the oracle).

The oracle shares only the model segments, the quantizer function, the client sampler and the
per-epoch shuffles with the engine. It walks each client's unpadded batches one by one, takes the
uplink/downlink path with an explicit ``jax.vjp`` instead of the custom-vjp link, runs hand-written
SGD with momentum, and averages with ``rho_k = n_k / sum_j n_j``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sflam_jax import quant
from sflam_jax.algorithms.base import Preprocess, RoundState, sample_clients
from sflam_jax.algorithms.sflam import SFLV1
from sflam_jax.data.batches import epoch_orders, make_client_data
from sflam_jax.engine import Engine
from sflam_jax.models import split as split_lib
from sflam_jax.models import vit

LR, MOMENTUM, B, E = 0.05, 0.9, 4, 2


def engine_of(model, pre, per_round=3, chunk_size=0, down_bits=32, cls=SFLV1, **kw):
    """The round engine of a protocol's training ``cls`` with the tests' SGD, E and B."""
    algorithm = cls(model, optax.sgd(LR, momentum=MOMENTUM), pre, E, B, down_bits=down_bits, **kw)
    return Engine(algorithm, per_round, chunk_size=chunk_size)


def _setup(sizes, cut_layer, seed=0):
    cfg = vit.vit_config("tiny", image_size=14, channels=1, num_classes=3, patch_size=7)
    model = split_lib.split(cfg, cut_layer)
    params_c, params_s = split_lib.split_params(
        vit.init_params(cfg, jax.random.key(seed)), cut_layer, cfg.depth
    )
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    images = rng.integers(0, 255, (n, 14, 14, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, n).astype(np.int32)
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    data = make_client_data(images, labels, parts, B)
    state = RoundState.create(params_c, params_s)
    return model, state, data, images, labels, parts


@functools.partial(jax.jit, static_argnums=0)
def _client_forward(model, pc, x, key):
    return model.client_apply(pc, x, key)


@functools.partial(jax.jit, static_argnums=0)
def _client_backward(model, pc, x, key, g):
    _, client_vjp = jax.vjp(lambda p: model.client_apply(p, x, key), pc)
    return client_vjp(g)[0]


@functools.partial(jax.jit, static_argnums=0)
def _server_grads(model, ps, a, y, key):
    def server_loss(p, a):
        logits = model.server_apply(p, a, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.value_and_grad(server_loss, argnums=(0, 1))(ps, a)


@jax.jit
def _sgd_momentum(params, mom, grads):
    mom = jax.tree.map(lambda m, g: MOMENTUM * m + g, mom, grads)
    return jax.tree.map(lambda p, m: p - LR * m, params, mom), mom


def _oracle_step(model, pc, ps, mom_c, mom_s, x, y, key, up_bits, down_bits):
    """One step of one client: explicit vjp through the quantized cut (the quantizer runs eagerly,
    outside any jit, as the link would), SGD with momentum by hand."""
    k_client, k_link, k_server = jax.random.split(key, 3)
    up_key, down_key = jax.random.split(k_link)
    smashed = _client_forward(model, pc, x, k_client)
    received = quant.stochastic_quantize(smashed, up_bits, up_key)
    loss, (g_s, g_a) = _server_grads(model, ps, received, y, k_server)
    g_c = _client_backward(
        model, pc, x, k_client, quant.stochastic_quantize(g_a, down_bits, down_key)
    )
    pc, mom_c = _sgd_momentum(pc, mom_c, g_c)
    ps, mom_s = _sgd_momentum(ps, mom_s, g_s)
    return pc, ps, mom_c, mom_s, loss


def _oracle_client(model, pc, ps, mom_s, images, labels, part, key, width, up_bits, down_bits, pre):
    """One client's local training (``E`` epochs of its unpadded batches) from ``(pc, ps)`` with
    a fresh device momentum and the server momentum ``mom_s``; ``key`` is the client's round key.
    Returns ``(pc, ps, mom_s, summed loss)``."""
    n = len(part)
    order_key, step_key = jax.random.split(key)
    orders = np.asarray(epoch_orders(order_key, jnp.int32(n), width, E))
    mom_c = jax.tree.map(jnp.zeros_like, pc)
    step, total = 0, 0.0
    for e in range(E):
        perm = orders[e][:n]
        assert sorted(perm.tolist()) == list(range(n))
        for t in range(-(-n // B)):
            rows = part[perm[t * B : (t + 1) * B]]
            x, y = pre(jnp.asarray(images[rows])), jnp.asarray(labels[rows])
            step_key_t = jax.random.fold_in(step_key, step)
            pc, ps, mom_c, mom_s, loss = _oracle_step(
                model, pc, ps, mom_c, mom_s, x, y, step_key_t, up_bits, down_bits
            )
            total += float(loss) * len(rows)
            step += 1
    return pc, ps, mom_s, total


def _fedavg(sizes, trees):
    """``sum_k (n_k / sum_j n_j) tree_k`` in float64."""
    rho = np.asarray(sizes, np.float64) / np.sum(sizes)
    return jax.tree.map(
        lambda *xs: sum(r * np.asarray(x, np.float64) for r, x in zip(rho, xs, strict=True)), *trees
    )


def _oracle_round(
    model,
    state,
    images,
    labels,
    parts,
    key,
    per_round,
    up_bits,
    down_bits,
    pre,
    shared_server=False,
    relay_client=False,
):
    """One round of SFL-V1 (default), SFL-V2 (``shared_server``: one server segment and its
    momentum, updated client after client) or SL (also ``relay_client``: the client segment is
    handed on). Returns ``(clients, w_c, w_s, mean train loss)``."""
    sample_key, train_key = jax.random.split(key)
    clients = np.asarray(sample_clients(sample_key, len(parts), per_round))
    width = -(-max(len(p) for p in parts) // B) * B
    finals, sizes, loss = [], [], 0.0
    last_c, shared_s = state.params_c, state.params_s
    shared_mom_s = jax.tree.map(jnp.zeros_like, state.params_s)
    for i, k in enumerate(clients):
        pc = last_c if relay_client else state.params_c
        ps = shared_s if shared_server else state.params_s
        mom_s = shared_mom_s if shared_server else jax.tree.map(jnp.zeros_like, ps)
        client_key = jax.random.fold_in(train_key, int(k))
        pc, ps, mom_s, total = _oracle_client(
            model,
            pc,
            ps,
            mom_s,
            images,
            labels,
            parts[k],
            client_key,
            width,
            up_bits[i],
            down_bits,
            pre,
        )
        loss += total
        finals.append((pc, ps))
        sizes.append(len(parts[k]))
        last_c, shared_s, shared_mom_s = pc, ps, mom_s
    return (
        clients,
        last_c if relay_client else _fedavg(sizes, [f[0] for f in finals]),
        shared_s if shared_server else _fedavg(sizes, [f[1] for f in finals]),
        loss / (E * sum(sizes)),
    )


CASES = [
    # (client sizes, cut, per-round bits, down bits, chunk): sizes are multiples of B when bits
    # < 32, so the oracle's unpadded batches draw the same rounding noise as the engine's.
    ([8, 16, 4, 12, 8], 0, [8, 8, 8], 32, 0),
    ([8, 16, 4, 12, 8], 1, [8, 8, 8], 32, 2),
    ([8, 16, 4, 12, 8], 1, [2, 32, 4], 4, 1),
    ([7, 13, 3, 10, 5], 1, [32, 32, 32], 32, 0),
    ([7, 13, 3, 10, 5], 0, [32, 32, 32], 32, 2),
    ([7, 13, 3, 10, 5], 2, [32, 32, 32], 32, 3),
]


@pytest.mark.parametrize(("sizes", "cut", "bits", "down_bits", "chunk"), CASES)
def test_round_matches_python_loop(sizes, cut, bits, down_bits, chunk):
    model, state, data, images, labels, parts = _setup(sizes, cut)
    pre = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
    alg = engine_of(model, pre, down_bits=down_bits, chunk_size=chunk)
    key = jax.random.key(42)
    clients, ref_c, ref_s, ref_loss = _oracle_round(
        model, state, images, labels, parts, key, 3, bits, down_bits, pre
    )
    new_state, metrics = jax.jit(alg.round)(state, data, key, jnp.asarray(bits, jnp.float32))
    np.testing.assert_array_equal(metrics["clients"], clients)
    chex.assert_trees_all_close(new_state.params_c, ref_c, atol=1e-5)
    chex.assert_trees_all_close(new_state.params_s, ref_s, atol=1e-5)
    np.testing.assert_allclose(metrics["train_loss"], ref_loss, rtol=1e-5)
    assert int(metrics["samples"]) == E * sum(sizes[c] for c in clients)
    assert int(new_state.round) == 1
    # The round really trained: the global model moved on both sides.
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params_s, state.params_s
    )
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_quantization_changes_the_result():
    model, state, data, *_ = _setup([8, 16, 4, 12, 8], 0)
    pre = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
    alg = engine_of(model, pre)
    run = jax.jit(alg.round)
    s2, _ = run(state, data, jax.random.key(1), 2)
    s32, _ = run(state, data, jax.random.key(1), 32)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s2.params_c, s32.params_c)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_round_compiles_once_and_is_deterministic():
    model, state, data, *_ = _setup([8, 16, 4, 12, 8], 1)
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
    model, *_ = _setup([4], 0)
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

    model, state, data, images, labels, parts = _setup(sizes, cut)
    pre = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
    eng = engine_of(model, pre, per_round=per_round, chunk_size=lanes)
    key = jax.random.key(5)
    clients, ref_c, ref_s, ref_loss = _oracle_round(
        model, state, images, labels, parts, key, per_round, [bits] * per_round, 32, pre
    )
    new, metrics = jax.jit(eng.round)(state, data, key, bits)
    np.testing.assert_array_equal(metrics["clients"], clients)
    # Float traffic agrees to 1e-6; over 20 steps the 8-bit stochastic rounding turns last-bit
    # differences into other draws (measured 4.6e-5 for the lanes and the chunks schedule alike).
    atol = 1e-5 if bits == 32 else 2e-4
    chex.assert_trees_all_close(new.params_c, ref_c, atol=atol)
    chex.assert_trees_all_close(new.params_s, ref_s, atol=atol)
    np.testing.assert_allclose(metrics["train_loss"], ref_loss, rtol=10 * atol)
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

    model, *_ = _setup([4], 0)
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
