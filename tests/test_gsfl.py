"""GSFL (SPEC section 6.1): its limits (one group is SL, S groups are SFLAM), a plain-Python loop
over groups and clients, the grouping, the grouped costs and its config errors."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import final_state, read_metrics
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

from sflam_jax import train
from sflam_jax.algorithms import gsfl
from sflam_jax.algorithms.base import Preprocess, sample_clients
from sflam_jax.engine import Engine
from sflam_jax.errors import ConfigError
from sflam_jax.validation import validate
from sflam_jax.wireless.channel import SystemParams, draw_devices
from sflam_jax.wireless.costs import Workload, sflam_round_costs, sl_round_costs

PRE = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
SIZES = [7, 13, 3, 10, 5, 9, 4]
# Multiples of B: with a quantized cut the oracle's unpadded batches then draw the engine's noise.
SIZES_Q = [8, 16, 4, 12, 8, 12, 4]


def _oracle_gsfl(model, state, images, labels, parts, key, per_round, groups, bits, down_bits):
    """A GSFL round by hand: the groups of ``groups`` (lists of positions in the sampling order)
    one after another, inside a group the clients in order on the group's pair of segments (the
    server momentum carried on, the device's fresh), then FedAvg of the groups by their samples.
    Returns ``(clients, w_c, w_s, mean train loss)``."""
    sample_key, train_key = jax.random.split(key)
    clients = np.asarray(sample_clients(sample_key, len(parts), per_round))
    width = -(-max(len(p) for p in parts) // B) * B
    finals, weights, loss = [], [], 0.0
    for group in groups:
        pc, ps = state.params_c, state.params_s
        mom_s = jax.tree.map(jnp.zeros_like, ps)
        for i in group:
            k = int(clients[i])
            pc, ps, mom_s, total = oracle_client(
                model,
                pc,
                ps,
                mom_s,
                images,
                labels,
                parts[k],
                jax.random.fold_in(train_key, k),
                width,
                bits[i],
                down_bits,
                PRE,
            )
            loss += total
        finals.append((pc, ps))
        weights.append(sum(len(parts[int(clients[i])]) for i in group))
    return (
        clients,
        fedavg(weights, [f[0] for f in finals]),
        fedavg(weights, [f[1] for f in finals]),
        loss / (E * sum(weights)),
    )


def _engine(model, per_round, groups, grouping="random", chunk_size=0, down_bits=32):
    algorithm = gsfl.GroupRelay(
        model,
        optax.sgd(LR, momentum=MOMENTUM),
        PRE,
        E,
        B,
        down_bits=down_bits,
        groups=groups,
        grouping=grouping,
        chunk_size=chunk_size,
    )
    return Engine(algorithm, per_round)


@pytest.mark.parametrize(
    ("groups", "grouping", "chunk", "bits"),
    [
        (2, "random", 0, [32] * 5),
        (3, "balanced", 2, [8, 4, 32, 8, 4]),
    ],
)
def test_round_matches_python_loop_over_groups(groups, grouping, chunk, bits):
    """Uneven groups (5 clients in 2 or 3 groups), groups vmapped in chunks with a padding group,
    quantized and float cuts: the jitted round equals the loop."""
    quantized = min(bits) < 32
    model, state, data, images, labels, parts = setup(SIZES_Q if quantized else SIZES, 1)
    key = jax.random.key(5)
    engine = _engine(model, 5, groups, grouping, chunk, down_bits=8)
    new, metrics = jax.jit(engine.round)(state, data, key, jnp.asarray(bits, jnp.float32))
    counts = np.asarray([len(p) for p in parts])[np.asarray(metrics["clients"])]
    tau = -(-counts // B) * E
    if grouping == "random":
        members = [list(range(m, 5, groups)) for m in range(groups)]
    else:  # longest first onto the least-loaded group (ties: the lower position and group)
        members, loads = [[] for _ in range(groups)], [0] * groups
        for i in sorted(range(5), key=lambda i: -tau[i]):
            g = int(np.argmin(loads))
            members[g].append(i)
            loads[g] += tau[i]
    assert len({len(m) for m in members}) > 1  # uneven groups
    clients, ref_c, ref_s, ref_loss = _oracle_gsfl(
        model, state, images, labels, parts, key, 5, members, bits, 8
    )
    np.testing.assert_array_equal(metrics["clients"], clients)

    # A group chains up to 3 clients (about 20 momentum steps, 8-bit gradients down): float32
    # rounding adds up to about 2e-5 on a few of the client segment's values, and may flip a
    # stochastic rounding decision (oracles.assert_close_through_rounding).
    def unquantized():
        float_round = jax.jit(_engine(model, 5, groups, grouping, chunk).round)
        floated, float_metrics = float_round(state, data, key, 32)
        return floated.params_c, floated.params_s, float_metrics["train_loss"]

    assert_close_through_rounding(
        (new.params_c, new.params_s, metrics["train_loss"]),
        (ref_c, ref_s, ref_loss),
        unquantized,
        atol=5e-5,
    )
    assert int(metrics["useful_client_steps"]) == tau.sum()
    assert int(metrics["computed_client_steps"]) >= tau.sum()


def _run(cfg, workdir):
    train.train_and_evaluate(cfg, str(workdir))
    return read_metrics(workdir), final_state(workdir, step=cfg.num_rounds)


def _assert_same_run(a, b, skip=()):
    (rows_a, state_a), (rows_b, state_b) = a, b
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for k, v in rb.items():
            if k not in skip:
                np.testing.assert_allclose(ra[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
    chex.assert_trees_all_close(state_a, state_b, atol=2e-5)


def test_one_group_is_sl(tiny_config, tmp_path):
    """``groups = 1`` with float traffic (SL's) gives SL's metrics, costs and final model."""
    cfg = tiny_config
    cfg.num_rounds, cfg.eval_every = 2, 2
    cfg.quant.up_bits = 32
    sl = cfg.copy_and_resolve_references()
    sl.algorithm = "sl"
    cfg.algorithm, cfg.gsfl.groups = "gsfl", 1
    run = _run(cfg, tmp_path / "gsfl")
    assert run[0][1]["client_group"] == [0, 0, 0]
    _assert_same_run(run, _run(sl, tmp_path / "sl"))


def test_all_groups_is_sflam(tiny_config, tmp_path):
    """``groups = S`` gives SFLAM's metrics, costs and final model at the same (8) bits."""
    cfg = tiny_config
    cfg.num_rounds, cfg.eval_every = 2, 2
    sflam = cfg.copy_and_resolve_references()
    cfg.algorithm, cfg.gsfl.groups = "gsfl", cfg.train.clients_per_round
    run = _run(cfg, tmp_path / "gsfl")
    assert run[0][1]["handover_bits"] == 0
    skip = ("computed_client_steps",)  # the lanes schedule pads less
    _assert_same_run(run, _run(sflam, tmp_path / "sflam"), skip)


def test_group_slots_random_and_balanced():
    times = jnp.asarray([3.0, 9.0, 1.0, 4.0, 7.0, 2.0, 5.0])
    random = np.asarray(gsfl.group_slots(3, "random", times))
    np.testing.assert_array_equal(random, [[0, 1, 2], [3, 4, 5], [6, -1, -1]])
    balanced = np.asarray(gsfl.group_slots(3, "balanced", times))
    assert balanced.shape == (5, 3)
    members = [sorted(int(p) for p in balanced[:, m] if p >= 0) for m in range(3)]
    assert sorted(itertools.chain(*members)) == list(range(7))
    # LPT: 9 -> g0, 7 -> g1, 5 -> g2, 4 -> g2, 3 -> g1, 2 -> g0 (tie), 1 -> g2 (11, 10, 10).
    assert members == [[1, 5], [0, 4], [2, 3, 6]]
    np.testing.assert_array_equal(
        gsfl.client_groups(jnp.asarray(balanced), 7), [1, 0, 2, 2, 1, 0, 2]
    )


@pytest.mark.parametrize("seed", range(5))
def test_balanced_grouping_is_near_the_best_split(seed):
    """LPT's slowest group is within Graham's 4/3 - 1/(3M) of the best split (brute force)."""
    rng = np.random.default_rng(seed)
    s, m = 8, 3
    times = rng.uniform(0.5, 5.0, s)
    slots = np.asarray(gsfl.group_slots(m, "balanced", jnp.asarray(times, jnp.float32)))
    lpt = max(times[slots[:, g][slots[:, g] >= 0]].sum() for g in range(m))
    best = min(
        max(times[np.asarray(a) == g].sum() for g in range(m))
        for a in itertools.product(range(m), repeat=s)
    )
    assert best <= lpt + 1e-9 <= (4 / 3 - 1 / (3 * m)) * best + 1e-5


def _costssetup(s=6):
    params = SystemParams()
    devices = draw_devices(jax.random.key(3), s, params)
    workload = Workload(2e6, 6e7, 4 * 64, 12_000, 32, 400_000)
    steps = jnp.asarray([4.0, 9.0, 2.0, 6.0, 5.0, 3.0][:s])
    full = jnp.full((s,), params.p_max_w)
    bits = jnp.full((s,), 8.0)
    return devices, steps, full, bits, workload, params


def test_costs_limits_are_sl_and_sflam():
    devices, steps, power, bits, workload, params = _costssetup()
    s = steps.shape[0]
    equal = jnp.full((s,), params.bandwidth_hz / s)
    one = gsfl.round_costs(devices, steps, power, equal, bits, workload, params, groups=1)
    sl = sl_round_costs(devices, steps, power, equal, bits, workload, params)
    np.testing.assert_allclose(one["round_latency_s"], sl["round_latency_s"], rtol=1e-6)
    np.testing.assert_allclose(one["round_energy_j"], sl["round_energy_j"], rtol=1e-6)
    assert float(one["extra"]["handover_bits"]) == 2 * 32 * workload.client_params * (s - 1)
    every = gsfl.round_costs(devices, steps, power, equal, bits, workload, params, groups=s)
    v1 = sflam_round_costs(devices, steps, power, equal, bits, workload, params)
    for k in ("round_latency_s", "round_energy_j"):
        np.testing.assert_allclose(every[k], v1[k], rtol=1e-6)
    assert float(every["extra"]["handover_bits"]) == 0


@pytest.mark.parametrize("grouping", gsfl.GROUPINGS)
def test_costs_are_the_slowest_groups_sum(grouping):
    """A plain-Python recomputation: each client's T_k at B/M and M server copies, a group's
    time their sum, the round the slowest group's; energy the sum over clients."""
    devices, steps, power, bits, workload, params = _costssetup()
    m = 2
    band = jnp.full((6,), params.bandwidth_hz / m)
    per = sflam_round_costs(devices, steps, power, band, bits, workload, params, server_copies=m)
    costs = gsfl.round_costs(
        devices, steps, power, band * 0.1, bits, workload, params, groups=m, grouping=grouping
    )
    group = np.asarray(costs["extra"]["client_group"])
    latency = np.asarray(per["latency_s"], np.float64)
    groups = [latency[group == g].sum() for g in range(m)]
    np.testing.assert_allclose(costs["extra"]["group_latency_s"], groups, rtol=1e-6)
    np.testing.assert_allclose(costs["round_latency_s"], max(groups), rtol=1e-6)
    np.testing.assert_allclose(costs["round_energy_j"], per["round_energy_j"], rtol=1e-6)
    split = costs["extra"]["round_compute_s"] + costs["extra"]["round_comm_s"]
    np.testing.assert_allclose(split, max(groups), rtol=1e-6)
    if grouping == "balanced":
        random = gsfl.round_costs(devices, steps, power, band, bits, workload, params, groups=m)
        assert costs["round_latency_s"] <= random["round_latency_s"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gsfl.groups", 0, "gsfl.groups=0 is invalid: must be an integer in [1, "),
        ("gsfl.groups", 4, "gsfl.groups=4 is invalid: must be an integer in [1, "),
        ("gsfl.grouping", "fastest", "gsfl.grouping='fastest' is invalid: allowed: 'random'"),
        ("train.chunk_size", 3, "train.chunk_size=3 is invalid: with gsfl"),
        ("allocation.method", "pgd", "allocation.method='pgd' is invalid: allowed: 'equal'"),
    ],
)
def test_bad_gsfl_fields_are_named(tiny_config, field, value, message):
    cfg = tiny_config
    cfg.algorithm = "gsfl"
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(cfg)
