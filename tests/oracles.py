"""The shared oracles of the protocol tests: plain Python loops of split training, and the
comparison through a stochastic quantizer.

The loops share only the model segments, the quantizer function, the client sampler and the
per-epoch shuffles with the engine. They walk each client's unpadded batches one by one, take the
uplink/downlink path with an explicit ``jax.vjp`` instead of the custom-vjp link, run hand-written
SGD with momentum, and average with ``rho_k = n_k / sum_j n_j``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sflam_jax import quant
from sflam_jax.algorithms.base import RoundState, sample_clients
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


def client_data(sizes, seed=0):
    """Random 14 px grey images of 3 classes for clients of ``sizes``: ``(client table, images,
    labels, parts)``."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    images = rng.integers(0, 255, (n, 14, 14, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, n).astype(np.int32)
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    return make_client_data(images, labels, parts, B), images, labels, parts


def setup(sizes, cut_layer, seed=0):
    cfg = vit.vit_config("tiny", image_size=14, channels=1, num_classes=3, patch_size=7)
    model = split_lib.split(cfg, cut_layer)
    params_c, params_s = split_lib.split_params(
        vit.init_params(cfg, jax.random.key(seed)), cut_layer, cfg.depth
    )
    state = RoundState.create(params_c, params_s)
    return model, state, *client_data(sizes, seed)


@functools.partial(jax.jit, static_argnums=0)
def client_forward(model, pc, x, key):
    return model.client_apply(pc, x, key)


@functools.partial(jax.jit, static_argnums=0)
def client_backward(model, pc, x, key, g):
    _, client_vjp = jax.vjp(lambda p: model.client_apply(p, x, key), pc)
    return client_vjp(g)[0]


@functools.partial(jax.jit, static_argnums=0)
def server_grads(model, ps, a, y, key):
    def server_loss(p, a):
        logits = model.server_apply(p, a, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.value_and_grad(server_loss, argnums=(0, 1))(ps, a)


@jax.jit
def sgd_momentum(params, mom, grads):
    mom = jax.tree.map(lambda m, g: MOMENTUM * m + g, mom, grads)
    return jax.tree.map(lambda p, m: p - LR * m, params, mom), mom


def oracle_step(model, pc, ps, mom_c, mom_s, x, y, key, up_bits, down_bits):
    """One step of one client: explicit vjp through the quantized cut (the quantizer runs eagerly,
    outside any jit, as the link would), SGD with momentum by hand."""
    k_client, k_link, k_server = jax.random.split(key, 3)
    up_key, down_key = jax.random.split(k_link)
    smashed = client_forward(model, pc, x, k_client)
    received = quant.stochastic_quantize(smashed, up_bits, up_key)
    loss, (g_s, g_a) = server_grads(model, ps, received, y, k_server)
    g_c = client_backward(
        model, pc, x, k_client, quant.stochastic_quantize(g_a, down_bits, down_key)
    )
    pc, mom_c = sgd_momentum(pc, mom_c, g_c)
    ps, mom_s = sgd_momentum(ps, mom_s, g_s)
    return pc, ps, mom_c, mom_s, loss


def oracle_client(model, pc, ps, mom_s, images, labels, part, key, width, up_bits, down_bits, pre):
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
            pc, ps, mom_c, mom_s, loss = oracle_step(
                model, pc, ps, mom_c, mom_s, x, y, step_key_t, up_bits, down_bits
            )
            total += float(loss) * len(rows)
            step += 1
    return pc, ps, mom_s, total


def fedavg(sizes, trees):
    """``sum_k (n_k / sum_j n_j) tree_k`` in float64."""
    rho = np.asarray(sizes, np.float64) / np.sum(sizes)
    return jax.tree.map(
        lambda *xs: sum(r * np.asarray(x, np.float64) for r, x in zip(rho, xs, strict=True)), *trees
    )


def oracle_round(
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
        pc, ps, mom_s, total = oracle_client(
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
        last_c if relay_client else fedavg(sizes, [f[0] for f in finals]),
        shared_s if shared_server else fedavg(sizes, [f[1] for f in finals]),
        loss / (E * sum(sizes)),
    )


def _distance(a, b) -> float:
    """The L2 distance of two trees of the same structure (float64)."""
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in leaves)))


def assert_close_through_rounding(got, want, unquantized, atol: float, share: float = 0.1):
    """``got`` against ``want``: the same training through a stochastic quantizer, computed in
    two ways that differ only in float order (a jitted round and a plain loop).

    Float-order noise (1e-7 relative) flips the rounding decision of the few values that sit at a
    rounding boundary; each flip is a whole quantization step, which the following local steps
    carry on, and which values flip depends on the CPU (an AVX2 VM turned one such comparison into
    397 of 1,024 values off by 5e-4, an AVX-512 VM into none). So either every value agrees to
    ``atol`` (no flip), or the distance is at most ``share`` of the quantization's own effect
    (``want`` against ``unquantized``, the same training with float traffic): a flipped draw moves
    a few values by one step, while a wrong bit width, key or a skipped quantizer moves every
    value by about the whole effect. ``unquantized`` may be a function that computes it.
    Measured on the lanes case of test_sflam (20 steps, 8 bits): the round against the loop
    2.7e-4, the round from a start perturbed by 1.2e-7 relative 2.3e-5, the quantization's effect
    3.6; so the flips use about 1e-4 of the allowed share.
    """
    leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    off = sum(int(np.sum(~np.isclose(g, w, rtol=0, atol=atol))) for g, w in leaves)
    if off == 0:
        return
    if callable(unquantized):  # computed only when a flip needs it (one more compiled round)
        unquantized = unquantized()
    distance, effect = _distance(got, want), _distance(want, unquantized)
    assert distance <= share * effect, (
        f"{off} values differ by more than {atol}, and the distance {distance:.3g} is more than "
        f"{share} of the quantization's own effect {effect:.3g}"
    )
