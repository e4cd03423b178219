"""FTTE and FedBuff (SPEC section 6.4): the event engine against a synchronous FedAvg loop and a
plain-Python heap event loop, the buffer weights, the sparse subset, resume and bad input."""

import dataclasses
import heapq
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sflam_jax import events, experiment, train
from sflam_jax.algorithms import sparse
from sflam_jax.algorithms.ftte import BufferRule
from sflam_jax.data.batches import epoch_orders, make_client_data
from sflam_jax.errors import ConfigError
from sflam_jax.models import split as split_lib
from sflam_jax.models import vit


def _config(tiny_config, algorithm="fedbuff", **ftte):
    cfg = tiny_config
    cfg.algorithm = algorithm
    cfg.train.local_epochs = 2
    for k, v in ftte.items():
        cfg.ftte[k] = v
    return cfg


def _build(cfg):
    exp = experiment.build_experiment(cfg)
    data = make_client_data(
        exp.dataset.train_images, exp.dataset.train_labels, exp.parts, cfg.train.batch_size
    )
    _, run_key = jax.random.split(jax.random.key(cfg.seed))
    return exp, data, run_key


def _run(engine, state, data, run_key, versions):
    step = jax.jit(lambda s: engine.step(s, data, run_key))
    records = []
    for _ in range(versions):
        state, metrics = step(state)
        records.append(jax.device_get(metrics))
    return state, records


def _whole(state):
    return jax.device_get(split_lib.merge_params(state.params_c, state.params_s))


class _Reference:
    """Whole-model local training in plain Python: the unsplit Flax ViT, one optax SGD step per
    batch of the client's epoch orders (no masks, no vmap). With a subset, the gradient of every
    other parameter is zeroed before the optimizer (so they never move), and the step gradients
    of the subset are kept for the variance weight."""

    def __init__(self, cfg, exp):
        self.cfg, self.exp = cfg, exp
        model_cfg = experiment.preset_config(cfg, exp.dataset.image_shape, exp.dataset.num_classes)
        self.vit = vit.ViT(model_cfg)
        self.tx = optax.sgd(cfg.optimizer.learning_rate, momentum=cfg.optimizer.momentum)
        width = -(-max(len(p) for p in exp.parts) // cfg.train.batch_size) * cfg.train.batch_size
        self.width = width

        @jax.jit
        def sgd_step(params, opt, x, y, keep):
            def loss_fn(p):
                logits = self.vit.apply({"params": p}, exp.preprocess(x))
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            grads = jax.tree.map(jnp.multiply, jax.grad(loss_fn)(params), keep)
            updates, opt = self.tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, grads

        self.sgd_step = sgd_step

    def train(self, params, client: int, key, subset=None):
        """The client's trained whole model from ``params`` with its training key; with
        ``subset`` (leaf paths) also the mean squared deviation of its subset's step gradients
        (float64; 0 with fewer than two steps)."""
        part = self.exp.parts[client]
        n, b = len(part), self.cfg.train.batch_size
        order_key, _ = jax.random.split(key)
        orders = np.asarray(
            epoch_orders(order_key, jnp.int32(n), self.width, self.cfg.train.local_epochs)
        )
        paths = sparse.leaf_paths(params)
        chosen = set(paths) if subset is None else subset
        keep = jax.tree.unflatten(
            jax.tree.structure(params), [float(path in chosen) for path in paths]
        )
        p, opt = params, self.tx.init(params)
        images, labels = self.exp.dataset.train_images, self.exp.dataset.train_labels
        steps = []
        for e in range(self.cfg.train.local_epochs):
            for t in range(-(-n // b)):
                rows = part[orders[e][:n][t * b : (t + 1) * b]]
                x, y = jnp.asarray(images[rows]), jnp.asarray(labels[rows])
                p, opt, grads = self.sgd_step(p, opt, x, y, keep)
                steps.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))
        if subset is None:
            return p
        g = np.asarray(steps, np.float64)
        sigma2 = 0.0
        if len(g) > 1:
            sigma2 = np.mean(np.sum(g**2, axis=1)) - np.sum(g.mean(axis=0) ** 2)
        return p, sigma2


def test_buffer_equal_to_concurrency_is_fedavg(tiny_config):
    """K = C, no stragglers, every parameter, s = u = 1: each version is one FedAvg round over the
    C clients dispatched at it (a synchronous plain-Python FedAvg loop with the same clients and
    training keys), every update fresh, every first trip downloading the whole model."""
    cfg = _config(tiny_config, concurrency=3, buffer_size=3, staleness="none")
    exp, data, run_key = _build(cfg)
    engine = exp.engine
    state, records = _run(engine, exp.initial, data, run_key, 3)

    ref = _Reference(cfg, exp)
    w = _whole(exp.initial)
    seen = set()
    for v, rec in enumerate(records):
        assert list(rec["staleness"]) == [0, 0, 0]
        # The clients dispatched at version v are the ones it aggregates.
        assert sorted(rec["arrival_seq"]) == list(range(3 * v, 3 * v + 3))
        finals, sizes = [], []
        for client, seq in zip(rec["clients"], rec["arrival_seq"], strict=True):
            finals.append(ref.train(w, int(client), events.training_key(run_key, int(seq))))
            sizes.append(len(exp.parts[int(client)]))
        rho = np.asarray(sizes) / sum(sizes)
        w = jax.tree.map(lambda *xs: sum(r * x for r, x in zip(rho, xs, strict=True)), *finals)
        if v == 0:
            trips = 3 * 4.0 * (engine.total_params + engine.subset_params)
            np.testing.assert_allclose(rec["sim_bytes"], trips, rtol=1e-6)
        seen |= set(map(int, rec["clients"]))
    got = _whole(state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), got, w)


class _TiedTrips(events.EventEngine):
    """Trips rounded up to whole multiples of 2 ms, so that arrivals tie."""

    def trip(self, key, counts, first, clients):
        costs = super().trip(key, counts, first, clients)
        return {**costs, "time_s": jnp.ceil(costs["time_s"] / 0.002) * 0.002}


@pytest.mark.parametrize("algorithm", ["fedbuff", "ftte"])
def test_matches_a_python_heap_event_loop(tiny_config, algorithm):
    """FedBuff (every parameter, ``s = (1 + tau)^-1/2``) and FTTE proper (a sparse subset that
    fits the budget, the same staleness weight and the variance weight ``1 / (1 + sigma_i^2 /
    buffer mean)``), C = 4, K = 2, half the devices 3x slower, against an event loop written
    with ``heapq`` and plain training: the same arrivals in the same order (ties by dispatch
    number), the same staleness, weights and global model."""
    cfg = _config(
        tiny_config,
        algorithm,
        concurrency=4,
        buffer_size=2,
        straggler_fraction=0.5,
        straggler_slowdown=3.0,
        memory_budget_bytes=3e5,
    )
    exp, data, run_key = _build(cfg)
    engine = _TiedTrips(
        **{f.name: getattr(exp.engine, f.name) for f in dataclasses.fields(exp.engine)}
    )
    versions = 6
    state, records = _run(engine, exp.initial, data, run_key, versions)

    ref = _Reference(cfg, exp)
    w = _whole(exp.initial)
    everything = frozenset(sparse.leaf_paths(w))
    subset = engine.clients.subset
    if algorithm == "ftte":
        assert subset != everything  # the budget leaves part of the model frozen
    else:
        assert subset == everything
    counts = np.asarray(data.counts)
    draw = jax.jit(engine.draw_dispatch)
    heap, clock, dispatched = [], np.float32(0), 0
    in_flight, seen = np.zeros(len(counts), bool), np.zeros(len(counts), bool)
    free = cfg.ftte.concurrency
    popped = []
    for version in range(versions):
        while free:
            d = jax.device_get(draw(run_key, dispatched, in_flight, seen, counts))
            for j in range(min(free, cfg.ftte.buffer_size)):
                c, seq = int(d["clients"][j]), int(d["seq"][j])
                trained, sigma2 = ref.train(w, c, events.training_key(run_key, seq), subset)
                delta = jax.tree.map(np.subtract, trained, w)
                arrival = np.float32(clock + np.float32(d["time_s"][j]))
                heapq.heappush(heap, (arrival, seq, c, version, counts[c], sigma2, delta))
                in_flight[c] = seen[c] = True
                dispatched += 1
                free -= 1
        buffer = [heapq.heappop(heap) for _ in range(cfg.ftte.buffer_size)]
        clock = buffer[-1][0]
        a = np.asarray([n * (1.0 + version - v) ** -0.5 for _, _, _, v, n, _, _ in buffer])
        if algorithm == "ftte":
            sigma2 = np.asarray([entry[5] for entry in buffer])
            a = a / (1.0 + sigma2 / sigma2.mean())
        mean = jax.tree.map(
            lambda *ds: sum(ai * x for ai, x in zip(a, ds, strict=True)) / a.sum(),
            *[entry[-1] for entry in buffer],
        )
        w = jax.tree.map(np.add, w, mean)
        popped.append(
            [
                (t, seq, c, version - v, ai / a.sum())
                for (t, seq, c, v, *_), ai in zip(buffer, a, strict=True)
            ]
        )
        for entry in buffer:
            in_flight[entry[2]] = False
        free = cfg.ftte.buffer_size

    order = []
    for rec, expected in zip(records, popped, strict=True):
        times, seqs, clients, stale, weights = map(np.asarray, zip(*expected, strict=True))
        np.testing.assert_array_equal(rec["arrival_s"], times)
        np.testing.assert_array_equal(rec["arrival_seq"], seqs)
        np.testing.assert_array_equal(rec["clients"], clients)
        np.testing.assert_array_equal(rec["staleness"], stale)
        # The variance weight's sigma^2 is a difference of float32 sums in the engine.
        np.testing.assert_allclose(rec["buffer_weights"], weights, rtol=1e-4)
        order += list(zip(rec["arrival_s"], rec["arrival_seq"], strict=True))
    assert order == sorted(order), "arrivals were not processed in (time, dispatch) order"
    times = [t for t, _ in order]
    assert len(set(times)) < len(times), "no tied arrivals: the tie-break went untested"
    assert max(max(r["staleness"]) for r in records) > 0
    if algorithm == "ftte":
        # The variance weight mattered: the weights are not the samples-and-staleness ones.
        plain = [
            np.asarray([n * (1.0 + s) ** -0.5 for n, s in zip(*x, strict=True)])
            for x in (
                (counts[np.asarray(r["clients"])], np.asarray(r["staleness"])) for r in records
            )
        ]
        assert any(
            not np.allclose(r["buffer_weights"], p / p.sum(), rtol=1e-3)
            for r, p in zip(records, plain, strict=True)
        )
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), _whole(state), w)


def test_buffer_weights():
    """A stale update weighs less than a fresh one with the same samples and variance (by
    ``(1 + tau)^-e``), a noisy one less than a quiet one (by ``1 / (1 + sigma^2 / mean)``), and
    without either weight the samples alone count."""
    counts, sigma2 = jnp.asarray([10, 10]), jnp.asarray([2.0, 2.0])
    a = BufferRule(0.5, True).weights(counts, jnp.asarray([0, 3]), sigma2)
    assert a[1] < a[0]
    np.testing.assert_allclose(a[1] / a[0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(a[0], 10 / 2, rtol=1e-6)  # sigma^2 = its mean: u = 1/2
    a = BufferRule(0.5, True).weights(counts, jnp.asarray([1, 1]), jnp.asarray([1.0, 3.0]))
    np.testing.assert_allclose(a / a[0], [1.0, (1 + 1 / 2) / (1 + 3 / 2)], rtol=1e-6)
    a = BufferRule(0.0, False).weights(jnp.asarray([3, 7]), jnp.asarray([0, 5]), sigma2)
    np.testing.assert_allclose(a, [3.0, 7.0])


def test_stragglers_are_a_fixed_share_of_the_devices():
    key = jax.random.key(3)
    for fraction, slow in ((0.0, 0), (0.5, 10), (0.9, 18), (1.0, 20)):
        factors = events.straggler_slowdowns(key, 20, fraction, 4.0)
        assert (factors == 4.0).sum() == slow and (factors == 1.0).sum() == 20 - slow
    np.testing.assert_array_equal(
        events.straggler_slowdowns(key, 20, 0.5, 4.0), events.straggler_slowdowns(key, 20, 0.5, 4.0)
    )


def test_selected_subset_fits_the_budget_and_only_it_changes(tiny_config):
    """``last_blocks`` picks the longest prefix of the units (head, last block's biases and
    norms, its kernels, ...) whose measured training memory fits the budget; FTTE's versions
    change exactly those parameters, and training them costs less memory, FLOPs and bytes than
    the whole model."""
    cfg = _config(tiny_config, "ftte", selection="all")
    exp, data, run_key = _build(cfg)
    training = exp.engine.clients.training
    whole = _whole(exp.initial)
    batch = (cfg.train.batch_size, *exp.dataset.image_shape)
    order = sparse.units(whole)
    assert [n for n, _ in order][:3] == ["head", "block_1.biases_norms", "block_1.kernels"]
    prefixes = [frozenset().union(*(u for _, u in order[: i + 1])) for i in range(len(order))]
    memory = [training.cost(whole, p, batch).memory_bytes for p in prefixes]
    assert memory == sorted(memory)
    budget = (memory[2] + memory[3]) / 2
    assert memory[2] < budget < memory[3]

    cfg.ftte.memory_budget_bytes, cfg.ftte.selection = budget, "last_blocks"
    exp, data, run_key = _build(cfg)
    subset = exp.engine.clients.subset
    assert subset == prefixes[2]
    assert exp.engine.cost.memory_bytes <= budget
    assert exp.system["device_memory_bytes"] < exp.system["full_device_memory_bytes"]
    assert exp.system["flops_per_sample"] < exp.system["full_flops_per_sample"]
    assert exp.system["update_bytes"] == 4 * sparse.size(sparse.take(whole, subset))
    assert exp.system["trainable_units"] == ["head", "block_1.biases_norms", "block_1.kernels"]

    state, _ = _run(exp.engine, exp.initial, data, run_key, 2)
    after = _whole(state)
    for path, old, new in zip(
        sparse.leaf_paths(whole), jax.tree.leaves(whole), jax.tree.leaves(after), strict=True
    ):
        if path in subset:
            assert not np.array_equal(old, new), path
        else:
            np.testing.assert_array_equal(old, new, err_msg=str(path))


def test_greedy_selection_fits_the_budget(tiny_config):
    """Greedy by loss gain per byte: the head and at least one more unit, within the budget."""
    cfg = _config(tiny_config, "ftte", selection="all", proxy_samples=64, proxy_steps=4)
    exp, _, _ = _build(cfg)
    whole = _whole(exp.initial)
    training = exp.engine.clients.training
    batch = (cfg.train.batch_size, *exp.dataset.image_shape)
    everything = frozenset(sparse.leaf_paths(whole))
    budget = 0.6 * training.cost(whole, everything, batch).memory_bytes
    cfg.ftte.memory_budget_bytes, cfg.ftte.selection = budget, "greedy"
    exp, _, _ = _build(cfg)
    subset = exp.engine.clients.subset
    head = sparse.units(whole)[0][1]
    assert head <= subset and head != subset and subset != everything
    assert exp.engine.cost.memory_bytes <= budget


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read().splitlines()


def test_ftte_resumes_exactly_and_stops_on_the_clock(tiny_config, tmp_path):
    """``stop_sim_seconds`` ends a run at the first version past it; resumed without it, the run
    writes the same metrics as an uninterrupted one (the in-flight clients, their results, the
    clock and the key stream are in the checkpoint)."""
    cfg = _config(tiny_config, "ftte", straggler_fraction=0.5, memory_budget_bytes=3e5)
    cfg.num_rounds = 5
    whole = tmp_path / "whole"
    last = train.train_and_evaluate(cfg, str(whole))
    system = json.loads((whole / "system.json").read_text())
    assert system["device_memory_bytes"] < system["full_device_memory_bytes"]

    times = [json.loads(line)["sim_time_s"] for line in _lines(whole)[1:]]
    part = tmp_path / "part"
    clocked = cfg.copy_and_resolve_references()
    clocked.ftte.stop_sim_seconds = (times[1] + times[2]) / 2
    record = train.train_and_evaluate(clocked, str(part))
    assert record["round"] == 3 and last["round"] == 5
    assert _lines(part) == _lines(whole)[:4]
    train.train_and_evaluate(cfg, str(part))
    assert _lines(part) == _lines(whole)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("buffer_size", 5, "ftte.buffer_size=5 is invalid: must be <= ftte.concurrency=4"),
        ("concurrency", 9, "ftte.concurrency=9 is invalid: must be <= data.num_clients=8"),
        ("straggler_fraction", 1.5, "ftte.straggler_fraction=1.5 is invalid"),
        ("straggler_fraction", -0.1, "ftte.straggler_fraction=-0.1 is invalid"),
        ("staleness", "linear", "ftte.staleness='linear' is invalid"),
        ("selection", "random", "ftte.selection='random' is invalid"),
    ],
)
def test_bad_ftte_fields_are_named(tiny_config, field, value, message):
    from sflam_jax.validation import validate

    cfg = _config(tiny_config, "ftte")
    cfg.ftte[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg)


def test_a_budget_no_subset_fits_is_named(tiny_config):
    cfg = _config(tiny_config, "ftte", memory_budget_bytes=1000.0)
    with pytest.raises(ConfigError, match=r"ftte.memory_budget_bytes=1000.0 is invalid: no "):
        experiment.build_experiment(cfg)


def test_vectorized_sweeps_refuse_the_event_protocols(tiny_config):
    from sflam_jax import sweep

    cfg = _config(tiny_config, "ftte")
    with pytest.raises(ConfigError, match="algorithm='ftte' is invalid in a vectorized sweep"):
        sweep.run_group([cfg], ["unused"], progress=False)


def test_a_diverging_update_stops_the_run_naming_the_version_and_client(tiny_config, tmp_path):
    from sflam_jax.errors import NonFiniteError

    cfg = _config(tiny_config, "fedbuff")
    cfg.optimizer.learning_rate, cfg.num_rounds = 1e4, 6
    with pytest.raises(NonFiniteError, match=r"round \d+: client \d+ produced a non-finite") as e:
        train.train_and_evaluate(cfg, str(tmp_path))
    assert "update" in str(e.value) and "ftte.server_lr" in str(e.value)
