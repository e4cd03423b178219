"""Property tests (hypothesis): partition, cut-layer quantizer, allocators."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sflam_jax import quant
from sflam_jax.allocation import IN_GRAPH, exact, pgd
from sflam_jax.allocation import problem as pb
from sflam_jax.data.partition import dirichlet_partition, iid_partition
from sflam_jax.wireless import channel, costs

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

# -- partition ----------------------------------------------------------------------------------


@st.composite
def labelled_sets(draw):
    n = draw(st.integers(1, 400))
    classes = draw(st.integers(1, 10))
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, classes - 1)))
    return labels, draw(st.integers(1, min(n, 30)))


def _assert_exact_cover(parts, n, k):
    assert len(parts) == k
    together = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(together), np.arange(n))  # every sample exactly once
    for p in parts:
        assert np.all(np.diff(p) > 0)


@SETTINGS
@given(labelled_sets(), st.floats(0.01, 100.0), st.integers(0, 2**31 - 1))
def test_dirichlet_partition_assigns_every_sample_once(data, alpha, seed):
    labels, k = data
    parts = dirichlet_partition(labels, k, alpha, seed, min_samples=0)
    _assert_exact_cover(parts, len(labels), k)
    again = dirichlet_partition(labels, k, alpha, seed, min_samples=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@SETTINGS
@given(labelled_sets(), st.integers(0, 2**31 - 1))
def test_iid_partition_assigns_every_sample_once(data, seed):
    labels, k = data
    parts = iid_partition(labels, k, seed)
    _assert_exact_cover(parts, len(labels), k)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


# -- quantizer ----------------------------------------------------------------------------------

_DRAWS = 4000


@functools.cache
def _quantize_many(shape):
    """Jitted: ``[_DRAWS, *shape]`` quantizations of one array under independent keys."""

    def many(a, bits, key):
        keys = jax.random.split(key, _DRAWS)
        return jax.vmap(lambda k: quant.stochastic_quantize(a, bits, k))(keys)

    return jax.jit(many)


@st.composite
def activations(draw):
    shape = draw(st.sampled_from([(1, 1), (1, 7), (3, 16), (2, 4, 5)]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    values = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(-1, 1, width=32, allow_subnormal=False),
        )
    )
    return values * np.float32(scale)


@SETTINGS
@given(activations(), st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_quantizer_stays_in_range_on_the_grid_and_is_unbiased(a, bits, seed):
    q = np.asarray(_quantize_many(a.shape)(a, bits, jax.random.key(seed)), np.float64)
    axes = tuple(range(1, a.ndim))
    lo = a.min(axis=axes, keepdims=True).astype(np.float64)
    hi = a.max(axis=axes, keepdims=True).astype(np.float64)
    assert np.all(q >= lo) and np.all(q <= hi)
    delta = (hi - lo) / (2.0**bits - 1)
    # Each value moves to a grid point at most one step away (float32 rounding may pick the
    # next one down when the value sits on a grid point) ...
    slack = 1e-6 * np.abs(a).max() + 1e-30
    assert np.all(np.abs(q - a) <= delta * (1 + 1e-3) + slack)
    steps = (q - lo) / np.where(delta > 0, delta, 1)
    assert np.all(np.abs(steps - np.round(steps)) <= 1e-2)
    # ... and its mean over independent keys is the value: the per-draw variance is at most
    # delta^2 / 4, so the mean of _DRAWS draws lies within 6 standard errors.
    tolerance = 6 * delta / (2 * np.sqrt(_DRAWS)) + slack
    assert np.all(np.abs(q.mean(axis=0) - a) <= tolerance)


# -- allocators ---------------------------------------------------------------------------------

PARAMS = channel.SystemParams()
WORK = costs.Workload(
    client_flops=1.2e6, server_flops=5e6, values_per_sample=1088, client_params=4000, batch_size=32
)
WEIGHTS = pb.Weights()
SOLVERS = {**IN_GRAPH, "pgd": functools.partial(pgd.allocate, options=pgd.PGDOptions(steps=200))}


def _problem(seed, counts, w_t, eps_q):
    devices = channel.draw_devices(jax.random.key(seed), len(counts), PARAMS)
    counts = jnp.asarray(counts, jnp.float32)
    steps = jnp.ceil(counts / WORK.batch_size)
    problem = pb.make_problem(devices, steps, counts / counts.sum(), WORK, PARAMS, WEIGHTS)
    return problem.replace(w_t=jnp.float32(w_t), w_e=jnp.float32(1 - w_t), eps_q=eps_q)


@functools.cache
def _solve(name, s):
    def solve(seed, counts, w_t, eps_q):
        problem = _problem(seed, counts, w_t, eps_q)
        allocation, _ = SOLVERS[name](problem)
        return allocation, pb.feasible(problem, allocation)

    return jax.jit(solve)


# The smallest budget any bits meet: delta(bits_max).
_MIN_BUDGET = float(quant.error_proxy(WEIGHTS.bits_max, WORK.values_per_sample, 10.0))


@st.composite
def problems(draw):
    s = draw(st.sampled_from([1, 2, 5, 9]))
    counts = draw(st.lists(st.integers(1, 3000), min_size=s, max_size=s))
    return (
        draw(st.integers(0, 2**31 - 1)),
        np.asarray(counts),
        draw(st.floats(0.05, 0.95)),
        np.float32(draw(st.floats(_MIN_BUDGET * 1.01, 5.0))),
    )


@pytest.mark.optimized
@pytest.mark.slow
@settings(max_examples=15, deadline=None, derandomize=True)
@given(problems())
def test_allocators_return_feasible_allocations(instance):
    seed, counts, w_t, eps_q = instance
    for name in SOLVERS:
        allocation, ok = _solve(name, len(counts))(seed, counts, w_t, eps_q)
        assert bool(ok), (name, allocation)
        bits = np.asarray(allocation.bits)
        assert np.all(bits == np.round(bits)), name
    problem = _problem(seed, counts, w_t, eps_q)
    allocation, diag = exact.allocate(problem, pb.smallest_bits(problem))
    assert bool(diag["feasible"]) and bool(pb.feasible(problem, allocation))
