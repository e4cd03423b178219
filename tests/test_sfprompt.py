"""SFPrompt (SPEC section 6.3): a round against a plain-Python reference with explicit vjps at
both cuts, the frozen parts, EL2N pruning, the local-loss phase, the vmapped round against a
per-client loop, the server's activation-only backward and the config errors."""

import dataclasses
import functools
import json

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
    client_data,
    fedavg,
    sgd_momentum,
)

from sflam_jax import experiment, quant, train
from sflam_jax.algorithms import sfprompt
from sflam_jax.algorithms.base import Preprocess, RoundState, sample_clients
from sflam_jax.allocation import IN_GRAPH, exact
from sflam_jax.allocation import problem as pb
from sflam_jax.data.batches import ClientRows, epoch_orders
from sflam_jax.engine import Engine
from sflam_jax.errors import ConfigError
from sflam_jax.models import vit
from sflam_jax.models.split import compiled_flops
from sflam_jax.models.ushape import UShape
from sflam_jax.validation import validate
from sflam_jax.wireless.channel import draw_devices

PRE = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
CFG = vit.ViTConfig(
    image_size=14,
    channels=1,
    num_classes=3,
    patch_size=7,
    hidden_size=32,
    depth=3,
    num_heads=2,
    mlp_dim=64,
)


def setup(sizes, head_blocks=1, tail_blocks=0, seed=0, prompt_len=2):
    model = UShape(CFG, prompt_len=prompt_len, head_blocks=head_blocks, tail_blocks=tail_blocks)
    params_c, params_s = model.segments(
        vit.init_params(CFG, jax.random.key(seed)), jax.random.key(9)
    )
    return model, RoundState.create(params_c, params_s), *client_data(sizes, seed)


def _engine(
    model,
    per_round,
    keep=1.0,
    local_loss_epochs=0,
    chunk_size=0,
    prune_first=False,
    schedule="lanes",
):
    algorithm = sfprompt.PromptTuning(
        model,
        optax.sgd(LR, momentum=MOMENTUM),
        PRE,
        E,
        B,
        keep=keep,
        local_loss_epochs=local_loss_epochs,
        prune_first_round=prune_first,
    )
    return Engine(algorithm, per_round, chunk_size=chunk_size, schedule=schedule)


@functools.partial(jax.jit, static_argnums=0)
def _oracle_step(model, trainable, frozen, body, x, y):
    """One split step by hand: device front forward, server body forward, device tail loss and
    gradients, the tail-input gradient up, the body's vjp (input only) down, the front's vjp to
    the prompts."""
    front_out, front_vjp = jax.vjp(lambda tr: model.front({**frozen, **tr}, x), trainable)
    body_out, body_vjp = jax.vjp(lambda h: model.body(body, h), front_out)

    def tail_loss(tr, z):
        logits = model.tail({**frozen, **tr}, z)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, (g_tail, g_z) = jax.value_and_grad(tail_loss, argnums=(0, 1))(trainable, body_out)
    (g_front,) = body_vjp(g_z)
    (g_prompts,) = front_vjp(g_front)
    grads = jax.tree.map(jnp.add, g_tail, g_prompts)  # disjoint leaves: one of each is zero
    return loss, grads


@functools.partial(jax.jit, static_argnums=0)
def _oracle_local_step(model, trainable, frozen, x, y):
    """One local-loss step by hand: front -> tail (body skipped), batch-mean cross entropy."""

    def loss(tr):
        logits = model.local_logits({**frozen, **tr}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(trainable)


def oracle_round(model, state, images, labels, parts, key, per_round, local_epochs=0):
    """One round with keep = 1, float traffic: each client from the global prompts and tail, its
    samples in their own order (nothing is pruned, so nothing is scored), ``local_epochs``
    epochs of the local-loss phase then ``E`` split epochs, each shuffled per epoch as the
    engine does, one hand-written momentum SGD state through both phases, FedAvg by samples."""
    sample_key, train_key = jax.random.split(key)
    clients = np.asarray(sample_clients(sample_key, len(parts), per_round))
    width = -(-max(len(p) for p in parts) // B) * B
    trainable0 = model.pick(state.params_c, model.trainable_keys)
    frozen = model.pick(state.params_c, model.frozen_keys)
    finals, sizes, loss_sum = [], [], 0.0
    for k in clients:
        part = parts[k]
        n = len(part)
        k_local, k_split, _, _ = jax.random.split(jax.random.fold_in(train_key, int(k)), 4)
        tr = trainable0
        mom = jax.tree.map(jnp.zeros_like, tr)
        if local_epochs:
            local = np.asarray(epoch_orders(k_local, jnp.int32(n), width, local_epochs))
            for e in range(local_epochs):
                perm = local[e][:n]
                for t in range(-(-n // B)):
                    rows = part[perm[t * B : (t + 1) * B]]
                    x, y = PRE(jnp.asarray(images[rows])), jnp.asarray(labels[rows])
                    tr, mom = sgd_momentum(tr, mom, _oracle_local_step(model, tr, frozen, x, y))
        orders = np.asarray(epoch_orders(k_split, jnp.int32(n), width, E))
        for e in range(E):
            perm = orders[e][:n]
            for t in range(-(-n // B)):
                rows = part[perm[t * B : (t + 1) * B]]
                x, y = PRE(jnp.asarray(images[rows])), jnp.asarray(labels[rows])
                loss, grads = _oracle_step(model, tr, frozen, state.params_s, x, y)
                tr, mom = sgd_momentum(tr, mom, grads)
                loss_sum += float(loss) * len(rows)
        finals.append(tr)
        sizes.append(n)
    return clients, fedavg(sizes, finals), loss_sum / (E * sum(sizes))


@pytest.mark.parametrize(("tail_blocks", "per_round"), [(0, 1), (1, 3)])
def test_round_matches_explicit_vjp_reference(tail_blocks, per_round):
    """One client (the tail on the class token) and three (a tail block on every token): the
    jitted round equals the reference; the body, the embedding and the front blocks come back
    bit-identical."""
    sizes = [7, 13, 3, 10, 5]
    model, state, data, images, labels, parts = setup(sizes, tail_blocks=tail_blocks)
    key = jax.random.key(4 + per_round)
    new, metrics = jax.jit(_engine(model, per_round).round)(state, data, key, 32)
    clients, ref, ref_loss = oracle_round(model, state, images, labels, parts, key, per_round)
    np.testing.assert_array_equal(metrics["clients"], clients)
    chex.assert_trees_all_close(model.pick(new.params_c, model.trainable_keys), ref, atol=1e-5)
    np.testing.assert_allclose(metrics["train_loss"], ref_loss, rtol=1e-5)
    for name in model.frozen_keys:
        chex.assert_trees_all_equal(new.params_c[name], state.params_c[name])
    chex.assert_trees_all_equal(new.params_s, state.params_s)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params_c, state.params_c)
    assert moved["prompts"] > 0 and max(jax.tree.leaves(moved["head"])) > 1e-3


def _probe_oracle(features, labels, parts, head, rounds, per_round, key):
    """Federated linear probe in plain JAX (no project code but the shared sample and shuffle
    draws): per client from the global final norm + classifier, its samples (keep 1: none
    pruned, none scored) shuffled per epoch, momentum SGD on the batch-mean cross entropy,
    FedAvg by samples; ``features`` are the frozen class tokens at the body's end ``[N, D]``."""

    def logits(h, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        z = (x - mu) / jnp.sqrt(var + CFG.layer_norm_eps) * h["norm"]["scale"] + h["norm"]["bias"]
        return z @ h["classifier"]["kernel"] + h["classifier"]["bias"]

    def loss(h, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(h, x), y).mean()

    grad = jax.jit(jax.grad(loss))
    sgd = optax.sgd(LR, momentum=MOMENTUM)
    width = -(-max(len(p) for p in parts) // B) * B
    for r in range(rounds):
        sample_key, train_key = jax.random.split(jax.random.fold_in(key, r))
        clients = np.asarray(sample_clients(sample_key, len(parts), per_round))
        finals, sizes = [], []
        for k in clients:
            part = parts[k]
            n = len(part)
            _, k_split, _, _ = jax.random.split(jax.random.fold_in(train_key, int(k)), 4)
            orders = np.asarray(epoch_orders(k_split, jnp.int32(n), width, E))
            h, opt = head, sgd.init(head)
            for e in range(E):
                perm = orders[e][:n]
                for t in range(-(-n // B)):
                    rows = part[perm[t * B : (t + 1) * B]]
                    updates, opt = sgd.update(grad(h, features[rows], labels[rows]), opt)
                    h = optax.apply_updates(h, updates)
            finals.append(h)
            sizes.append(n)
        head = jax.tree.map(jnp.float32, fedavg(sizes, finals))
    return head


def test_no_prompts_no_front_blocks_is_a_federated_linear_probe():
    """``prompt_len = 0``, ``head_blocks = 0``, keep 1, no local-loss phase, float crossings:
    three rounds of the engine equal a plain FedAvg of the final norm + classifier on the frozen
    class tokens, precomputed once (1e-5); the frozen parts come back bit-identical."""
    sizes = [7, 13, 3, 10, 5]
    model, state, data, images, labels, parts = setup(sizes, head_blocks=0, prompt_len=0)
    assert "prompts" not in state.params_c  # no empty arrays (orbax refuses to save them)
    front = model.front(state.params_c, PRE(jnp.asarray(images)))
    features = model.body(state.params_s, front)[:, 0]
    key = jax.random.key(11)
    round_fn = jax.jit(_engine(model, 2).round)
    new = state
    for r in range(3):
        new = new.replace(round=jnp.int32(r))
        new, _ = round_fn(new, data, jax.random.fold_in(key, r), 32)
    want = _probe_oracle(features, labels, parts, state.params_c["head"], 3, 2, key)
    chex.assert_trees_all_close(new.params_c["head"], want, atol=1e-5)
    assert (
        max(
            jax.tree.leaves(
                jax.tree.map(
                    lambda a, b: float(jnp.max(jnp.abs(a - b))),
                    new.params_c["head"],
                    state.params_c["head"],
                )
            )
        )
        > 1e-3
    )
    chex.assert_trees_all_equal(new.params_c["embedding"], state.params_c["embedding"])
    chex.assert_trees_all_equal(new.params_s, state.params_s)


def test_local_loss_phase_matches_a_plain_loop():
    """Two clients with one local-loss epoch before the split phase (keep 1, float traffic): the
    round equals the plain loop (local steps through front -> tail, then split steps, one
    momentum state)."""
    sizes = [9, 14, 6]
    model, state, data, images, labels, parts = setup(sizes)
    key = jax.random.key(21)
    engine = _engine(model, 2, local_loss_epochs=1)
    new, metrics = jax.jit(engine.round)(state, data, key, 32)
    clients, ref, ref_loss = oracle_round(
        model, state, images, labels, parts, key, 2, local_epochs=1
    )
    np.testing.assert_array_equal(metrics["clients"], clients)
    chex.assert_trees_all_close(model.pick(new.params_c, model.trainable_keys), ref, atol=1e-5)
    np.testing.assert_allclose(metrics["train_loss"], ref_loss, rtol=1e-5)
    # The phase did something: the same round without it ends elsewhere.
    without, _ = jax.jit(_engine(model, 2).round)(state, data, key, 32)
    assert float(jnp.max(jnp.abs(without.params_c["prompts"] - new.params_c["prompts"]))) > 1e-4


def test_quantized_crossings_are_the_quantizer_applied_by_hand():
    """8-bit uplink, float downlink: the split loss's gradient equals the explicit-vjp step with
    ``stochastic_quantize`` applied by hand to the front's output (its key: the first half of the
    step key's first half) and to the tail-input gradient sent up (the second half of the second
    half); the float crossings pass values through unchanged."""
    model, state, data, images, labels, _ = setup([8], tail_blocks=1)
    alg = _engine(model, 1).algorithm  # down_bits = 32
    trainable = model.pick(state.params_c, model.trainable_keys)
    frozen = model.pick(state.params_c, model.frozen_keys)
    body = state.params_s
    x, y = PRE(jnp.asarray(images)), jnp.asarray(labels)
    key = jax.random.key(5)
    mask = jnp.ones((8,), bool)

    def got(tr):
        return alg.split_loss(tr, frozen, body, images, labels, mask, 8, key)[0]

    loss, grads = jax.value_and_grad(got)(trainable)

    def by_hand(bits):
        k_front, k_back = jax.random.split(key)
        up_front, _ = jax.random.split(k_front)
        _, down_back = jax.random.split(k_back)
        front, front_vjp = jax.vjp(lambda tr: model.front({**frozen, **tr}, x), trainable)
        received = quant.stochastic_quantize(front, bits, up_front)
        out, body_vjp = jax.vjp(lambda h: model.body(body, h), received)

        def tail_loss(tr, z):
            logits = model.tail({**frozen, **tr}, z)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, (g_tail, g_z) = jax.value_and_grad(tail_loss, argnums=(0, 1))(trainable, out)
        (g_front,) = body_vjp(quant.stochastic_quantize(g_z, bits, down_back))
        (g_prompts,) = front_vjp(g_front)
        return value, jax.tree.map(jnp.add, g_tail, g_prompts)

    want_loss, want = by_hand(8)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_close_through_rounding(grads, want, lambda: by_hand(32)[1], atol=1e-6)
    # The quantizer mattered: float crossings give another gradient.
    _, floats = by_hand(32)
    assert float(jnp.max(jnp.abs(floats["prompts"] - want["prompts"]))) > 1e-6


def test_vmapped_round_equals_a_loop_over_clients():
    """Pruning, the local-loss phase and an 8-bit cut on: clients on two lanes, in chunks of two
    (vmapped, a padding slot) and one at a time give the same round."""
    model, state, data, *_ = setup([8, 16, 4, 12, 8])
    key = jax.random.key(2)
    state = state.replace(round=jnp.int32(1))  # a pruned round
    results = [
        jax.jit(
            _engine(model, 3, keep=0.5, local_loss_epochs=1, chunk_size=c, schedule=schedule).round
        )(state, data, key, 8)
        for c, schedule in ((2, "lanes"), (2, "chunks"), (1, "lanes"))
    ]
    for new, metrics in results[1:]:
        chex.assert_trees_all_close(new.params_c, results[0][0].params_c, atol=1e-6)
        np.testing.assert_allclose(metrics["train_loss"], results[0][1]["train_loss"], rtol=1e-6)
    # Half of each client's samples trained (E epochs of floor(n / 2)).
    counts = np.asarray([8, 16, 4, 12, 8])[np.asarray(results[0][1]["clients"])]
    assert int(results[0][1]["samples"]) == E * np.sum(counts // 2)


def test_el2n_keeps_exactly_the_hardest():
    logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]))
    labels = jnp.asarray([0, 0, 2])
    # By hand: sqrt(0.3^2 + 0.2^2 + 0.1^2), sqrt(0.9^2 + 0.8^2 + 0.1^2), sqrt(2 * 0.3^2 + 0.6^2).
    want = np.sqrt([0.14, 1.46, 0.54])
    np.testing.assert_allclose(sfprompt.el2n(logits, labels), want, rtol=1e-5)
    scores = jnp.asarray([0.3, 0.9, 0.1, 0.9, 0.5, 7.0])  # the last row is padding
    np.testing.assert_array_equal(sfprompt.hardest_first(scores, 5), [1, 3, 4, 0, 2, 5])
    alg = _engine(setup([4])[0], 1, keep=0.5).algorithm
    np.testing.assert_array_equal(alg.kept(jnp.asarray([5, 4, 1, 0]), False), [2, 2, 0, 0])
    np.testing.assert_array_equal(alg.kept(jnp.asarray([5, 4]), True), [5, 4])


def _np_el2n(logits, labels):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return np.sqrt(np.sum(p**2, -1))


def test_scores_through_the_body():
    """``sfprompt.score = "body"``: at float crossings the scores are numpy's EL2N of the whole
    model's evaluation logits; at 8 bits up they are the front's output quantized by hand (key:
    the first half of ``fold_in(key, batch start)``); padding rows score -inf."""
    model, state, _, images, labels, _ = setup([8], tail_blocks=1)
    alg = _engine(model, 1, keep=0.5).algorithm
    alg = dataclasses.replace(alg, score_through_body=True).for_round(state)
    count, width = 6, 8
    rows = ClientRows(jnp.asarray(images[:width]), jnp.asarray(labels[:width]))
    params_c, body = state.params_c, state.params_s
    x, key = PRE(jnp.asarray(images[:width])), jax.random.key(3)
    got = np.asarray(alg.scores(params_c, rows, count, width, 32, key))
    logits = np.asarray(model.logits(params_c, body, x), np.float64)
    np.testing.assert_allclose(got[:count], _np_el2n(logits, labels[:width])[:count], rtol=1e-5)
    assert np.all(np.isneginf(got[count:]))

    by_hand = []
    for start in range(0, width, B):
        k_up, _ = jax.random.split(jax.random.fold_in(key, start))
        front = model.front(params_c, x[start : start + B])
        out = model.body(body, quant.stochastic_quantize(front, 8, k_up))
        by_hand.append(np.asarray(model.tail(params_c, out), np.float64))
    want = _np_el2n(np.concatenate(by_hand), labels[:width])
    got8 = np.asarray(alg.scores(params_c, rows, count, width, 8, key))
    np.testing.assert_allclose(got8[:count], want[:count], rtol=1e-4)
    assert np.max(np.abs(got8[:count] - got[:count])) > 1e-6  # the quantizer mattered


@pytest.mark.parametrize(("head_blocks", "moves"), [(1, True), (0, False)])
def test_local_loss_phase_reaches_the_prompts_through_the_head(head_blocks, moves):
    """With a head block the class token attends to the prompts, so the local loss (body skipped)
    has a prompt gradient; with none (and no tail blocks) the classifier sees only the class
    token and the prompts get none."""
    model, state, data, images, labels, _ = setup([8], head_blocks=head_blocks)
    alg = _engine(model, 1).algorithm
    trainable = model.pick(state.params_c, model.trainable_keys)
    frozen = model.pick(state.params_c, model.frozen_keys)
    mask = jnp.ones((8,), bool)
    grads = jax.grad(lambda tr: alg.local_loss(tr, frozen, images, labels, mask, 32, None)[0])(
        trainable
    )
    assert (float(jnp.max(jnp.abs(grads["prompts"]))) > 0) == moves


def test_a_separate_local_head_keeps_the_tail_out_of_the_local_loss():
    """``sfprompt.local_head = "separate"``: the body-skipping loss moves the prompts and the
    local classifier, never the tail's; the local classifier starts as a copy of the tail's and
    the split loss never reads it."""
    model, state, data, images, labels, _ = setup([8])
    model = UShape(CFG, 2, 1, 0, local_head=True)
    params_c, _ = model.segments(vit.init_params(CFG, jax.random.key(0)), jax.random.key(9))
    chex.assert_trees_all_equal(params_c["local_head"], params_c["head"])
    alg = _engine(model, 1).algorithm
    trainable = model.pick(params_c, model.trainable_keys)
    frozen = model.pick(params_c, model.frozen_keys)
    mask = jnp.ones((8,), bool)
    local = jax.grad(lambda tr: alg.local_loss(tr, frozen, images, labels, mask, 32, None)[0])
    grads = local(trainable)
    assert float(jnp.max(jnp.abs(grads["prompts"]))) > 0
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["local_head"])) > 0
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["head"]))
    body = state.params_s
    split = jax.grad(
        lambda tr: alg.split_loss(tr, frozen, body, images, labels, mask, 32, jax.random.key(1))[0]
    )
    grads = split(trainable)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["local_head"]))


def test_server_forms_no_weight_gradient():
    """The compiled split step costs the body's forward less than the same step that also
    differentiates the body's weights (what a weight gradient would add)."""
    model, state, data, images, labels, _ = setup([8])
    alg = _engine(model, 1).algorithm
    trainable = model.pick(state.params_c, model.trainable_keys)
    frozen = model.pick(state.params_c, model.frozen_keys)
    x, y, mask = images[:B], labels[:B], jnp.ones((B,), bool)
    key = jax.random.key(0)

    def ours(tr, body):
        return jax.grad(lambda tr: alg.split_loss(tr, frozen, body, x, y, mask, 32, key)[0])(tr)

    def with_body(tr, body):
        return jax.grad(
            lambda tr, body: alg.split_loss(tr, frozen, body, x, y, mask, 32, key)[0],
            argnums=(0, 1),
        )(tr, body)

    flops = compiled_flops
    body_fwd = flops(
        lambda body, h: model.body(body, h), state.params_s, jnp.zeros((B, *model.up_shape))
    )
    saved = flops(with_body, trainable, state.params_s) - flops(ours, trainable, state.params_s)
    assert saved > 0.5 * body_fwd


def _prompt_problem(cfg, s, seed, w_t=0.5, bits=None):
    """SFPrompt's allocation problem for S random devices of unequal sizes (tiny config)."""
    cfg.algorithm = "sfprompt"
    cfg.allocation.w_t, cfg.allocation.w_e = w_t, 1.0 - w_t
    planner = experiment.planner_for(cfg, (14, 14, 1), 4)
    key = jax.random.key(seed)
    devices = draw_devices(key, s, planner.params)
    counts = jax.random.randint(jax.random.fold_in(key, 1), (s,), 5, 400).astype(jnp.float32)
    steps = jnp.ceil(counts / cfg.train.batch_size)
    problem = pb.make_problem(
        devices, steps, counts / counts.sum(), planner.workload, planner.params,
        planner.weights, planner.loads, counts,
    )  # fmt: skip
    return planner, problem, counts


def test_allocators_run_on_sfprompts_traffic(tiny_config):
    """Every allocator optimises SFPrompt's own round: the solver's costs are the cost model's
    (pruned samples, four crossings, prompts and tail aggregated), not SFL-V1's."""
    planner, problem, counts = _prompt_problem(tiny_config, 6, 0)
    s = counts.shape[0]
    bits = jnp.full((s,), 8.0)
    sfl_v1 = pb.make_problem(
        problem.devices, problem.steps, problem.rho, planner.workload, planner.params,
        planner.weights,
    )  # fmt: skip
    objectives = {}
    for method, allocate in IN_GRAPH.items():
        allocation, diag = allocate(problem, bits)
        assert bool(pb.feasible(problem, allocation)), method
        solved = pb.evaluate(problem, allocation)
        model = planner.cost_model(
            problem.devices, problem.steps, allocation.power_w, allocation.bandwidth_hz,
            allocation.bits, planner.workload, planner.params, planner.weights.down_bits,
            counts=counts,
        )  # fmt: skip
        for k in ("latency_s", "energy_j", "round_latency_s", "round_energy_j"):
            np.testing.assert_allclose(solved[k], model[k], rtol=1e-6, err_msg=f"{method} {k}")
        other = pb.evaluate(sfl_v1, allocation)["round_latency_s"]
        assert abs(float(other) / float(solved["round_latency_s"]) - 1) > 0.05, method
        objectives[method] = float(solved["objective"])
    best, _ = exact.allocate(problem, bits)
    optimum = float(pb.evaluate(problem, best)["objective"])
    assert objectives["pgd"] <= optimum * (1 + 1e-3)
    assert objectives["bcd"] <= optimum * (1 + 1e-2)
    assert optimum < objectives["equal"] * (1 - 1e-2)


def test_exact_on_sfprompt_beats_a_grid_of_the_cost_model(tiny_config):
    """Two devices: the float64 optimum of SFPrompt's problem against a brute-force grid over
    bandwidth and powers of its cost model (``T_ref``, ``E_ref`` from the cost model too)."""
    planner, problem, counts = _prompt_problem(tiny_config, 2, 3, w_t=0.3)
    bw, p_max = planner.params.bandwidth_hz, planner.params.p_max_w
    bits = jnp.array([6.0, 12.0])

    def cost(power, band, b):
        return planner.cost_model(
            problem.devices, problem.steps, power, band, b, planner.workload, planner.params,
            planner.weights.down_bits, counts=counts,
        )  # fmt: skip

    ref = cost(jnp.full(2, p_max), jnp.full(2, bw / 2), jnp.full(2, 32.0))
    n = 161
    beta = jnp.linspace(0.002, 0.998, n) * bw
    power = jnp.linspace(0.002, 1.0, n) * p_max
    b1, p1, p2 = (x.ravel() for x in jnp.meshgrid(beta, power, power, indexing="ij"))

    def objective(b1, p1, p2):
        c = cost(jnp.stack([p1, p2]), jnp.stack([b1, bw - b1]), bits)
        t, e = (
            c["round_latency_s"] / ref["round_latency_s"],
            c["round_energy_j"] / ref["round_energy_j"],
        )
        return 0.3 * t + 0.7 * e

    grid = float(jax.jit(jax.vmap(objective))(b1, p1, p2).min())
    _, diag = exact.allocate(problem, bits)
    assert float(diag["objective"]) <= grid * (1 + 1e-6)
    assert grid <= float(diag["objective"]) * (1 + 3e-3)


def test_free_bits_budget_counts_both_uplink_crossings(tiny_config):
    planner, problem, counts = _prompt_problem(tiny_config, 5, 1)
    w = planner.workload
    assert w.budget_values == w.up_values + w.down_values != w.values_per_sample
    allocation, _ = IN_GRAPH["pgd"](problem, None)
    assert bool(pb.feasible(problem, allocation))
    rho = counts / counts.sum()
    by_hand = jnp.sum(rho * quant.error_proxy(allocation.bits, w.up_values + w.down_values, 10.0))
    np.testing.assert_allclose(pb.quant_budget_used(problem, allocation.bits), by_hand, rtol=1e-6)


def _hand_costs(w, params, counts, bits, down_bits, gain, cpu, power, band):
    """SFPrompt's round by hand from its workload's per-sample FLOPs and sizes (SPEC sections 3
    and 6.3), float64: pruned split samples, four crossings per split sample, prompts and tail
    aggregated once each way."""
    n = np.asarray(counts, np.float64)
    kept = np.floor(w["keep"] * n + 1e-6)
    split = w["epochs"] * kept
    scored = n if w["keep"] < 1 else 0 * n  # no pruning, no scores
    flops = scored * w["score_flops"] + w["local_loss_epochs"] * kept * w["local_flops"]
    flops += split * w["device_split_flops"]
    cycles = flops / params.flops_per_cycle
    server = split * w["server_split_flops"] + scored * w["server_score_flops"]
    server = server * len(n) / params.server_flops

    def payload(b, values):
        return 32.0 * values if b >= 32 else values * b + 64.0

    agg = 32.0 * w["trainable_params"]
    up = split * (payload(bits, w["up_values"]) + payload(bits, w["down_values"])) + agg
    down = split * (payload(down_bits, w["down_values"]) + payload(down_bits, w["up_values"])) + agg
    if w["score_body"]:  # each scored sample's front output up, the body's output down
        up += scored * payload(bits, w["up_values"])
        down += scored * payload(down_bits, w["down_values"])
    n0 = 10 ** ((params.noise_dbm_per_hz - 30) / 10)
    r_up = band * np.log2(1 + power * gain / (band * n0))
    r_dn = band * np.log2(1 + params.server_power_w * gain / (band * n0))
    latency = cycles / cpu + server + up / r_up + down / r_dn
    energy = params.kappa * cpu**2 * cycles + power * up / r_up
    fl_flops = w["epochs"] * n.sum() * w["full_train_flops"]
    fl_bytes = 2 * 32.0 * w["full_params"] * len(n) / 8
    air = (up.sum() + down.sum()) / 8
    return {
        "latency_s": latency,
        "energy_j": energy,
        "device_flops": flops.sum(),
        "air_bytes": air,
        "fl_device_flops": fl_flops,
        "fl_air_bytes": fl_bytes,
        "device_compute_ratio": flops.sum() / fl_flops,
        "traffic_ratio": air / fl_bytes,
    }


@pytest.mark.parametrize(("keep", "score"), [(0.6, "shortcut"), (0.6, "body"), (1.0, "shortcut")])
def test_cost_model_by_hand(tiny_config, keep, score):
    """The cost model of two devices of unequal sizes and channels against ``_hand_costs``:
    scores on the device, through the body, and none (nothing pruned)."""
    import dataclasses

    from sflam_jax.wireless.channel import Devices

    cfg = tiny_config
    cfg.algorithm, cfg.sfprompt.keep, cfg.sfprompt.local_epochs = "sfprompt", keep, 2
    cfg.sfprompt.score = score
    planner = experiment.planner_for(cfg, (14, 14, 1), 4)
    w = dataclasses.asdict(planner.workload)
    gain, cpu = np.array([3e-10, 4e-11]), np.array([1.2e9, 0.7e9])
    power, band, counts = np.array([0.1, 0.2]), np.array([4e6, 1e6]), np.array([17.0, 6.0])
    devices = Devices(jnp.array([50.0, 200.0]), jnp.asarray(gain), jnp.asarray(cpu))
    steps = np.ceil(counts / cfg.train.batch_size)
    out = sfprompt.round_costs(
        devices, steps, jnp.asarray(power), jnp.asarray(band), jnp.array([6.0, 6.0]),
        planner.workload, planner.params, 32, counts=jnp.asarray(counts),
    )  # fmt: skip
    hand = _hand_costs(w, planner.params, counts, 6, 32, gain, cpu, power, band)
    assert (w["keep"], w["local_loss_epochs"], w["score_body"]) == (keep, 2, score == "body")
    np.testing.assert_allclose(out["latency_s"], hand["latency_s"], rtol=1e-5)
    np.testing.assert_allclose(out["energy_j"], hand["energy_j"], rtol=1e-5)
    np.testing.assert_allclose(out["round_latency_s"], hand["latency_s"].max(), rtol=1e-5)
    for k in ("device_flops", "air_bytes", "fl_device_flops", "fl_air_bytes"):
        np.testing.assert_allclose(out["extra"][k], hand[k], rtol=1e-5, err_msg=k)
    for k in ("device_compute_ratio", "traffic_ratio"):
        np.testing.assert_allclose(out["extra"][k], hand[k], rtol=1e-5, err_msg=k)


def test_trains_through_the_trainer_and_reports_its_costs(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.algorithm, cfg.num_rounds, cfg.eval_every = "sfprompt", 1, 1
    cfg.allocation.method, cfg.allocation.optimize_bits = "pgd", True
    record = train.train_and_evaluate(cfg, str(tmp_path))
    assert cfg.allocation.bits_min <= record["bits_min"] <= record["bits_max"] <= 16
    assert record["quant_error"] <= cfg.allocation.eps_q * (1 + 1e-6)
    # The round's FLOPs and full fine-tuning's, by hand from system.json and its clients' sizes
    # (channel-free, so any bits and powers give them).
    with open(tmp_path / "system.json") as f:
        w = json.load(f)
    parts = experiment.build_experiment(cfg).parts
    counts = np.asarray([len(parts[c]) for c in record["clients"]], np.float64)
    ones = np.ones_like(counts)
    hand = _hand_costs(w, experiment.planner_for(cfg, (14, 14, 1), 4).params, counts, 8, 32,
                       ones, ones, ones, ones)  # fmt: skip
    for k in ("device_flops", "fl_device_flops", "fl_air_bytes", "device_compute_ratio"):
        np.testing.assert_allclose(record[k], hand[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sfprompt.keep", 0.0, r"sfprompt.keep=0.0 is invalid: must be in \(0, 1\]"),
        ("sfprompt.keep", 1.5, r"sfprompt.keep=1.5 is invalid"),
        ("sfprompt.prompt_len", -1, r"sfprompt.prompt_len=-1 is invalid: must be an integer >= 0"),
        ("sfprompt.tail_blocks", 1, r"sfprompt.head_blocks=1 \+ sfprompt.tail_blocks=1 is invalid"),
    ],
)
def test_bad_sfprompt_fields_are_named(tiny_config, field, value, message):
    cfg = tiny_config
    cfg.algorithm = "sfprompt"
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_backbone_without_the_blocks_is_named(tiny_config):
    cfg = tiny_config
    cfg.algorithm, cfg.model.pretrained = "sfprompt", "some/checkpoint"
    cfg.sfprompt.head_blocks = 3
    validate(cfg)  # the checkpoint's depth is known once it is read
    with pytest.raises(ConfigError, match="depth of some/checkpoint .3 blocks."):
        sfprompt.build(cfg, CFG)
