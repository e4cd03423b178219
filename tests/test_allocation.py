"""Allocators against the exact optimum and a brute-force grid (SPEC section 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sflam_jax.allocation import deadline, exact, pgd
from sflam_jax.allocation import problem as pb
from sflam_jax.wireless import channel, costs

PARAMS = channel.SystemParams()
WORK = costs.Workload(
    client_flops=1.2e6,
    server_flops=5e6,
    values_per_sample=17 * 64,
    client_params=4000,
    batch_size=32,
)


def make_batch(key, num, s, w_t=None):
    """``num`` random instances with S devices and random steps as one batched problem (leading
    axis ``num``, built in one vmapped call), with random w_T unless given."""
    keys = jax.random.split(key, num)
    if w_t is None:
        w_ts = jax.random.uniform(jax.random.fold_in(key, 7), (num,), minval=0.05, maxval=0.95)
    else:
        w_ts = jnp.full((num,), w_t, jnp.float32)

    def one(k):
        devices = channel.draw_devices(k, s, PARAMS)
        steps = jax.random.randint(jax.random.fold_in(k, 1), (s,), 1, 100).astype(jnp.float32)
        return pb.make_problem(devices, steps, steps / steps.sum(), WORK, PARAMS, pb.Weights())

    batch = jax.jit(jax.vmap(one))(keys)
    return batch.replace(w_t=w_ts, w_e=1.0 - w_ts)


def make_instances(key, num, s, w_t=None):
    """The instances of ``make_batch`` one by one."""
    batch = make_batch(key, num, s, w_t)
    return [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(num)]


@pytest.mark.optimized
def test_exact_matches_brute_force_grid():
    n = 241
    for problem in make_instances(jax.random.key(0), 3, 2):
        bits = jnp.array([6.0, 12.0])
        allocation, diag = exact.allocate(problem, bits)
        assert bool(diag["feasible"])
        beta1 = jnp.linspace(0.002, 0.998, n) * PARAMS.bandwidth_hz
        power = jnp.linspace(0.002, 1.0, n) * PARAMS.p_max_w
        b1, p1, p2 = (x.ravel() for x in jnp.meshgrid(beta1, power, power, indexing="ij"))
        grid = pb.Allocation(
            power_w=jnp.stack([p1, p2], -1),
            bandwidth_hz=jnp.stack([b1, PARAMS.bandwidth_hz - b1], -1),
            bits=jnp.broadcast_to(bits, (b1.size, 2)),
        )
        values = jax.jit(jax.vmap(lambda a: pb.evaluate(problem, a)["objective"]))(grid)
        best_grid = float(values.min())
        # The exact optimum is never beaten by the grid and the grid gets close to it.
        assert float(diag["objective"]) <= best_grid * (1 + 1e-6)
        assert best_grid <= float(diag["objective"]) * (1 + 2e-3)


def test_exact_solution_structure():
    (problem,) = make_instances(jax.random.key(1), 1, 6, w_t=0.5)
    bits = jnp.full(6, 8.0)
    allocation, diag = exact.allocate(problem, bits)
    out = pb.evaluate(problem, allocation)
    # All bandwidth is used and every device finishes at the deadline (energy falls with time).
    np.testing.assert_allclose(allocation.bandwidth_hz.sum(), PARAMS.bandwidth_hz, rtol=1e-5)
    np.testing.assert_allclose(out["latency_s"], diag["deadline_s"], rtol=1e-4)
    # Any small feasible perturbation of the bandwidth split does not improve the objective.
    for seed in range(5):
        noise = jax.random.normal(jax.random.key(seed), (6,)) * 0.01
        beta = allocation.bandwidth_hz * jnp.exp(noise)
        beta = beta / beta.sum() * PARAMS.bandwidth_hz
        other, _ = deadline.polish(problem, beta, bits)
        assert float(pb.evaluate(problem, other)["objective"]) >= float(diag["objective"]) * (
            1 - 1e-6
        )


SIZES = [2, 5, 13, 34, 89, 200]


@pytest.mark.optimized
@pytest.mark.slow
def test_pgd_within_tenth_of_a_percent_of_exact_on_500_instances():
    gaps = []
    for i, s in enumerate(SIZES):
        num = 500 // len(SIZES) + (1 if i < 500 % len(SIZES) else 0)
        batch = make_batch(jax.random.key(100 + s), num, s)
        bits = jax.random.randint(jax.random.key(s), (num, s), 2, 17).astype(jnp.float32)
        _, ref = exact.allocate(batch, bits)
        assert bool(jnp.all(ref["feasible"]))
        allocations, diag = jax.jit(jax.vmap(lambda p, b: pgd.allocate(p, b)))(batch, bits)
        assert bool(jnp.all(pb.feasible(batch, allocations, budget=False)))
        gaps.append(np.asarray(diag["objective"]) / np.asarray(ref["objective"]) - 1.0)
    gaps = np.concatenate(gaps)
    assert gaps.size == 500
    assert np.mean(gaps <= 1e-3) >= 0.99, np.sort(gaps)[-10:]
    assert gaps.max() <= 1e-2
    assert gaps.min() >= -1e-5  # nothing beats the global optimum


def test_weights_validation_names_the_field():
    with pytest.raises(ValueError, match="allocation.w_t=0"):
        pb.Weights(w_t=0.0, w_e=1.0)
    with pytest.raises(ValueError, match="must equal 1"):
        pb.Weights(w_t=0.5, w_e=0.6)
    with pytest.raises(ValueError, match="allocation.bits_min=0"):
        pb.Weights(bits_min=0)


def test_bcd_never_increases_the_objective_and_meets_the_budget():
    from sflam_jax.allocation import bcd
    from sflam_jax.allocation.refine import RefineOptions

    # BCD's own iterations (the integer refinement after them is tested in test_refine.py).
    off = RefineOptions(sweeps=0)
    for s in (2, 7, 40):
        batch = make_batch(jax.random.key(300 + s), 6, s)
        allocations, diag = jax.jit(jax.vmap(lambda p: bcd.allocate(p, refine=off)))(batch)
        history = np.asarray(diag["history"])
        assert np.all(np.diff(history, axis=1) <= 1e-7 * history[:, :-1])
        assert np.all(history[:, -1] < history[:, 0])  # better than equal bandwidth, full power
        assert bool(jnp.all(diag["feasible"]))  # power, bandwidth, bits range and budget


@pytest.mark.slow
def test_pgd_and_bcd_with_free_bits_meet_the_budget_and_beat_equal():
    from sflam_jax.allocation import baselines, bcd

    for s in (3, 16):
        # A tight budget: the smallest uniform bits that meet it are well above bits_min.
        batch = make_batch(jax.random.key(400 + s), 3, s)
        for solver in (pgd.allocate, bcd.allocate):
            allocations, diag = jax.jit(jax.vmap(lambda p, f=solver: f(p)))(batch)
            assert bool(jnp.all(diag["feasible"]))
            used = jax.vmap(pb.quant_budget_used)(batch, allocations.bits)
            assert bool(jnp.all(used <= batch.eps_q * (1 + 1e-6)))
            assert bool(jnp.all(allocations.bits == jnp.round(allocations.bits)))
            _, base = jax.vmap(lambda p: baselines.equal(p))(batch)
            assert bool(jnp.all(diag["objective"] <= base["objective"] * (1 + 1e-6)))


@pytest.mark.optimized
def test_exact_bit_search_beats_uniform_bits_on_small_instances():
    (problem,) = make_instances(jax.random.key(5), 1, 2, w_t=0.5)
    best, diag = exact.allocate_bits_search(problem)
    assert float(pb.quant_budget_used(problem, best.bits)) <= float(problem.eps_q)
    _, uniform = exact.allocate(problem, pb.smallest_bits(problem))
    assert float(diag["objective"]) <= float(uniform["objective"]) * (1 + 1e-6)
    # PGD's own bit choice is no better than the exhaustive search.
    _, free = pgd.allocate(problem)
    assert float(free["objective"]) >= float(diag["objective"]) * (1 - 1e-5)


def test_bcd_swap_matching_on_subchannels():
    from sflam_jax.allocation import bcd

    (problem,) = make_instances(jax.random.key(9), 1, 6, w_t=0.5)
    n = 40
    bits = jnp.full(6, 8.0)
    continuous, cont = bcd.allocate(problem, bits)
    start = bcd.round_to_subchannels(continuous.bandwidth_hz, PARAMS.bandwidth_hz, n)
    assert float(start.sum()) == n and float(start.min()) >= 1
    rounded, _ = deadline.polish(problem, start * PARAMS.bandwidth_hz / n, bits)
    allocation, diag = jax.jit(lambda p: bcd.allocate(p, bits, subchannels=n))(problem)
    units = np.asarray(allocation.bandwidth_hz) / (PARAMS.bandwidth_hz / n)
    np.testing.assert_allclose(units, np.round(units), atol=1e-3)
    assert round(units.sum()) == n and units.min() >= 1
    assert bool(diag["feasible"])
    # Matching never loses against the rounded start; the discrete split cannot beat the optimum.
    assert float(diag["objective"]) <= float(pb.evaluate(problem, rounded)["objective"]) + 1e-7
    _, best = exact.allocate(problem, bits)
    assert float(diag["objective"]) >= float(best["objective"]) * (1 - 1e-6)
    # On this instance the matching moves subchannels, and each move lowers the objective.
    assert int(diag["moves"]) > 0
    assert float(diag["objective"]) < float(pb.evaluate(problem, rounded)["objective"]) * (1 - 1e-3)
    assert not np.array_equal(units.round(), np.asarray(start))
    with pytest.raises(ValueError, match="subchannels=3"):
        bcd.allocate(problem, bits, subchannels=3)
