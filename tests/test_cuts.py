"""The ESFL problem (per-device cuts, server shares) against brute force (SPEC section 6.2)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from sflam_jax import quant
from sflam_jax.allocation import cuts, exact
from sflam_jax.wireless import channel

PARAMS = channel.SystemParams()
DEPTH = 4
BATCH = 16


def make_table(depth=DEPTH, seed=0):
    """A ViT-like table: each block moves ``block`` FLOPs from the server to the device and adds
    parameters and activation memory on the device."""
    rng = np.random.default_rng(seed)
    cut = np.arange(depth + 1)
    block, embed, head = 4e7 * rng.uniform(0.8, 1.2), 2e6, 1e5
    return cuts.CutTable(
        cut=jnp.asarray(cut, jnp.int32),
        client_flops=jnp.asarray(embed + block * cut, jnp.float32),
        server_flops=jnp.asarray(block * (depth - cut) + head, jnp.float32),
        values=jnp.full(cut.shape, 17 * 64, jnp.float32),
        client_params=jnp.asarray(3e3 + 5e4 * cut, jnp.float32),
        memory_bytes=jnp.asarray(1e6 + 4e6 * cut, jnp.float32),
    )


def make_problem(key, s, table=None, memory=(1e6, 2e7), server_flops=4e10):
    """Random devices (gains, clocks, memory, steps). A small server makes the cut matter."""
    params = channel.SystemParams(server_flops=server_flops)
    devices = channel.draw_devices(key, s, params)
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    mem = jax.random.uniform(k1, (s,), minval=memory[0], maxval=memory[1])
    steps = jax.random.randint(k2, (s,), 1, 40).astype(jnp.float32)
    return cuts.CutProblem(
        devices=devices,
        memory_bytes=mem,
        steps=steps,
        table=make_table() if table is None else table,
        batch_size=BATCH,
        down_bits=32,
        params=params,
    )


def fixed_cut_optimum(problem, cut_vector, bits):
    """Least T_round for fixed cuts, in numpy float64: the shares equalise the finish times,
    ``sum_k w_k / (T - d_k) = F`` solved by Brent's method (independent of the solver's code)."""
    s = problem.num_devices
    power = np.full(s, PARAMS.p_max_w)
    band = np.full(s, PARAMS.bandwidth_hz / s)
    with jax.enable_x64(True):
        per = cuts.per_cut_times(problem, power, band, np.full(s, bits), jnp.float64)
        d = np.asarray(per["device_s"])[np.arange(s), cut_vector]
        w = np.asarray(per["server_work"])[np.arange(s), cut_vector]
    f = problem.params.server_flops
    lo = d.max() * (1 + 1e-15) + 1e-300
    hi = d.max() + w.sum() / f * 2 + 1.0
    return brentq(lambda t: np.sum(w / (t - d)) - f, lo, hi, xtol=1e-14, rtol=1e-14)


def brute_force(problem, bits):
    allowed = np.asarray(problem.allowed())
    best = np.inf
    for vector in itertools.product(range(problem.table.size), repeat=problem.num_devices):
        vector = np.asarray(vector)
        if allowed[np.arange(len(vector)), vector].all():
            best = min(best, fixed_cut_optimum(problem, vector, bits))
    return best


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_exact_is_the_brute_force_optimum(s):
    chosen = set()
    for seed in range(3):
        problem = make_problem(jax.random.key(10 * s + seed), s)
        with jax.enable_x64(True):
            allocation, diag = cuts.exact(problem, 8.0, dtype=jnp.float64)
        best = brute_force(problem, 8)
        assert bool(diag["feasible"])
        np.testing.assert_allclose(float(diag["deadline_s"]), best, rtol=1e-9)
        # The allocation it returns meets that deadline and uses at most the whole server.
        assert float(jnp.sum(allocation.server_flops)) <= problem.params.server_flops * (1 + 1e-5)
        costs = cuts.round_costs(problem, allocation)
        assert float(costs["round_latency_s"]) <= best * (1 + 1e-5)
        assert bool(jnp.all(problem.allowed()[jnp.arange(s), allocation.cut]))
        chosen.update(np.asarray(allocation.cut).tolist())
    assert s == 1 or len(chosen) > 1  # the instances exercise the choice of cut


def test_memory_limits_change_the_optimum():
    """A device short of memory is held to shallow cuts, and the optimum honours it."""
    problem = make_problem(jax.random.key(3), 3, memory=(2e7, 2e7))
    free, _ = cuts.exact(problem, 8.0)
    deep = int(jnp.max(free.cut))
    assert deep > 0
    tight = problem.replace(
        memory_bytes=problem.memory_bytes.at[:].set(float(make_table().memory_bytes[deep - 1]))
    )
    held, diag = cuts.exact(tight, 8.0)
    assert bool(diag["feasible"]) and int(jnp.max(held.cut)) <= deep - 1
    assert float(diag["round_latency_s"]) >= float(
        cuts.round_costs(problem, free)["round_latency_s"]
    )


def test_a_device_no_cut_fits_is_named_not_a_crash():
    problem = make_problem(jax.random.key(4), 3, memory=(2e7, 2e7))
    problem = problem.replace(memory_bytes=problem.memory_bytes.at[1].set(1.0))
    for solve in (cuts.exact, cuts.alternate):
        allocation, diag = solve(problem, 8.0)
        assert not bool(diag["feasible"])
        assert int(diag["infeasible_device"]) == 1
        assert int(allocation.cut[1]) == 0  # the least-memory cut
        assert np.isfinite(float(diag["round_latency_s"]))


def test_alternating_is_monotone_and_never_beats_exact():
    for seed in range(8):
        problem = make_problem(jax.random.key(100 + seed), 6)
        allocation, diag = jax.jit(lambda p: cuts.alternate(p, 8.0))(problem)
        history = np.asarray(diag["history"])
        assert np.all(np.diff(history) <= 1e-6 * history[:-1])
        with jax.enable_x64(True):
            _, best = cuts.exact(problem, 8.0, dtype=jnp.float64)
        t = float(diag["round_latency_s"])
        assert t >= float(best["deadline_s"]) * (1 - 1e-5)
        assert t <= history[0] * (1 + 1e-6)


def _joint_setup(seed, s):
    from sflam_jax.allocation.problem import Weights
    from sflam_jax.wireless.costs import Workload

    problem = make_problem(jax.random.key(seed), s)
    rho = jax.random.dirichlet(jax.random.key(seed + 1), jnp.ones(s))
    workload = Workload(0.0, 0.0, 17 * 64, 0, BATCH)
    weights = Weights(w_t=0.5, w_e=0.5, eps_q=float(quant.error_proxy(6.7, 17 * 64, 10.0)))
    return problem, rho, weights, workload


def _sflam_at_a_fixed_cut(ref, s, cut, start_bits, fixed_bits):
    """SFLAM's allocator (pgd; free bits when ``fixed_bits`` is None) at ``cut`` for every device
    with equal server shares, as a cut allocation, and pgd's diagnostics."""
    from sflam_jax.allocation import joint, pgd

    fixed = cuts.CutAllocation(
        cut=jnp.full((s,), cut, jnp.int32),
        server_flops=ref.equal,
        power_w=jnp.zeros(s),
        bandwidth_hz=jnp.zeros(s),
        bits=start_bits,
    )
    at = ref.links.replace(load_data=ref.at_cuts(fixed.cut, fixed.server_flops))
    links, diag = pgd.allocate(at, fixed_bits, joint.JointOptions().pgd)
    return fixed.replace(
        power_w=links.power_w, bandwidth_hz=links.bandwidth_hz, bits=links.bits
    ), diag


@pytest.mark.parametrize("s", [3, 8])
def test_joint_is_feasible_and_never_worse_than_esfl_or_sflam_at_a_fixed_cut(s):
    from sflam_jax.allocation import joint
    from sflam_jax.allocation import problem as pb

    problem, rho, weights, workload = _joint_setup(200 + s, s)
    cut = 1
    solve = jax.jit(lambda p, r: joint.allocate(p, r, weights, workload, cut))
    allocation, diag = solve(problem, rho)
    assert bool(diag["feasible"])
    assert bool(jnp.all(problem.allowed()[jnp.arange(s), allocation.cut]))
    assert float(jnp.sum(allocation.server_flops)) <= problem.params.server_flops * (1 + 1e-5)
    assert float(jnp.max(allocation.power_w)) <= problem.params.p_max_w * (1 + 1e-6)
    assert float(jnp.sum(allocation.bandwidth_hz)) <= problem.params.bandwidth_hz * (1 + 1e-5)
    assert bool(jnp.all(allocation.bits == jnp.round(allocation.bits)))
    # The links problem it hands pgd costs the allocation as the cut model does.
    np.testing.assert_allclose(diag["links_objective"], diag["objective"], rtol=1e-5)

    ref = joint._Joint(problem, rho, weights, workload, cut)
    smallest = pb.smallest_bits(ref.links)
    # ESFL's optimum (equal bandwidth, full power) at the smallest bits meeting the budget.
    esfl, _ = cuts.exact(problem, smallest)
    assert float(diag["objective"]) <= float(ref.objective(esfl)) * (1 + 1e-6)
    # SFLAM's allocator (pgd, free bits) at the fixed cut with equal server shares.
    sflam, links_diag = _sflam_at_a_fixed_cut(ref, s, cut, smallest, None)
    np.testing.assert_allclose(ref.objective(sflam), links_diag["objective"], rtol=1e-5)
    assert float(diag["objective"]) <= float(ref.objective(sflam)) * (1 + 1e-6)
    if s <= 4:
        # Its bits are within 0.5% of the integer optimum at its own cuts and shares.
        at = ref.links.replace(load_data=ref.at_cuts(allocation.cut, allocation.server_flops))
        _, best = exact.allocate_bits_search(at)
        assert float(diag["objective"]) <= float(best["objective"]) * 1.005


def test_joint_with_fixed_bits_keeps_them_and_beats_both_starts():
    """``allocation.optimize_bits = False``: every device stays at the given bits; the result is
    never worse than ESFL's optimum at those bits, nor than pgd's power and bandwidth at the
    config's cut with equal shares and those bits."""
    from sflam_jax.allocation import joint

    s, cut = 5, 1
    problem, rho, weights, workload = _joint_setup(300, s)
    bits = jnp.full((s,), 6.0)
    allocation, diag = jax.jit(
        lambda p, r, b: joint.allocate(p, r, weights, workload, cut, bits=b)
    )(problem, rho, bits)
    np.testing.assert_array_equal(allocation.bits, bits)
    ref = joint._Joint(problem, rho, weights, workload, cut)
    esfl, _ = cuts.exact(problem, bits)
    assert float(diag["objective"]) <= float(ref.objective(esfl)) * (1 + 1e-6)
    sflam, _ = _sflam_at_a_fixed_cut(ref, s, cut, bits, bits)
    np.testing.assert_array_equal(sflam.bits, bits)
    assert float(diag["objective"]) <= float(ref.objective(sflam)) * (1 + 1e-6)
