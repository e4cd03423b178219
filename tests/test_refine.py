"""Integer bits of pgd and bcd against the integer optimum (exhaustive for small S, a float64
local search beyond)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sflam_jax import quant
from sflam_jax.allocation import bcd, exact, pgd
from sflam_jax.allocation import problem as pb
from sflam_jax.wireless import channel, costs

PARAMS = channel.SystemParams()
WORK = costs.Workload(
    client_flops=1.2e6, server_flops=5e6, values_per_sample=17 * 64, client_params=4000,
    batch_size=32,
)  # fmt: skip
# A budget of about 7 bits on average (between two uniform levels, so no instance sits on it).
EPS_Q = float(quant.error_proxy(6.7, WORK.values_per_sample, 10.0))


def instances(key, num, s):
    """``num`` instances: random devices and steps, Dirichlet data weights, random w_T."""

    def one(k):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        devices = channel.draw_devices(k1, s, PARAMS)
        steps = jax.random.randint(k2, (s,), 1, 100).astype(jnp.float32)
        rho = jax.random.dirichlet(k3, jnp.ones(s))
        problem = pb.make_problem(devices, steps, rho, WORK, PARAMS, pb.Weights(eps_q=EPS_Q))
        w_t = jax.random.uniform(k4, minval=0.1, maxval=0.9)
        return problem.replace(w_t=w_t, w_e=1.0 - w_t)

    return jax.jit(jax.vmap(one))(jax.random.split(key, num))


def solve_all(batch):
    """pgd's and bcd's free-bit objectives for a batch of instances, and their bits."""
    out = {}
    for name, solver in (("pgd", pgd.allocate), ("bcd", bcd.allocate)):
        allocations, diag = jax.jit(jax.vmap(lambda p, f=solver: f(p)))(batch)
        assert bool(jnp.all(diag["feasible"])), name
        assert bool(jnp.all(allocations.bits == jnp.round(allocations.bits))), name
        out[name] = np.asarray(diag["objective"])
    return out


def one(batch, i):
    return jax.tree.map(lambda x: x[i], batch)


@pytest.mark.optimized
@pytest.mark.slow
def test_integer_bits_within_half_a_percent_of_exhaustive_search():
    num, s = 5, 4
    batch = instances(jax.random.key(74), num, s)
    got = solve_all(batch)
    for i in range(num):
        _, best = exact.allocate_bits_search(one(batch, i))
        for name, values in got.items():
            assert values[i] <= float(best["objective"]) * 1.005, (name, i)
            assert values[i] >= float(best["objective"]) * (1 - 1e-4), (name, i)


@pytest.mark.optimized
@pytest.mark.slow
def test_integer_bits_within_half_a_percent_of_a_local_search():
    num, s = 2, 8
    batch = instances(jax.random.key(90), num, s)
    got = solve_all(batch)
    for i in range(num):
        problem = one(batch, i)
        _, reference = exact.local_bit_search(problem, pb.smallest_bits(problem))
        reference = float(reference["objective"])
        for name, values in got.items():
            assert values[i] <= reference * 1.005, (name, i, values[i], reference)
