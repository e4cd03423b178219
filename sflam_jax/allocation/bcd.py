"""Block coordinate descent, the paper's scheme (SPEC section 4), in JAX.

Blocks, visited in turn for a fixed number of iterations:

- bits: the smallest uniform bits that meet the learning budget (the objective only grows with
  bits, so this block is solved once);
- bandwidth, for the current powers: equal finish times, ``T_k(beta_k) = T`` for every device with
  ``sum_k beta_k = B`` (bisection on T, and on each ``beta_k``);
- power, for the current bandwidth: for a fixed split the problem is one-dimensional and convex in
  the deadline (each device sends at the least power that meets it), solved exactly by
  ``pgd.polish``. The paper approximates this block by successive convex approximation; the exact
  solve is at least as good.

A block's result is kept only when it does not raise the objective, so the objective never
increases from one iteration to the next; ``diagnostics["history"]`` records it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sflam_jax.allocation.pgd import polish
from sflam_jax.allocation.problem import (
    Allocation,
    Problem,
    evaluate,
    feasible,
    link_loads,
    smallest_bits,
)
from sflam_jax.allocation.search import bisect
from sflam_jax.wireless.channel import rate_bps

_LN2 = 0.6931471805599453


def equal_finish_bandwidth(problem: Problem, power_w, bits) -> jax.Array:
    """Bandwidth split under which every device finishes at the same time with its power."""
    loads = link_loads(problem, bits)
    a, d, h = loads["compute_s"], loads["up_bits"], loads["down_bits"]
    g, p = problem.devices.gain, problem.params
    n0, total = p.noise_w_per_hz, p.bandwidth_hz
    s = problem.num_devices

    def finish(beta):
        return a + d / rate_bps(beta, power_w, g, n0) + h / rate_bps(beta, p.server_power_w, g, n0)

    def needed(deadline):
        lo = jnp.full_like(g, total * 1e-9)
        hi = jnp.full_like(g, total)
        return bisect(lambda b: finish(b) <= deadline, lo, hi, 50, log=True)

    t_lo = jnp.max(a + (d / power_w + h / p.server_power_w) * n0 * _LN2 / g)
    t_hi = jnp.max(finish(jnp.full_like(g, total / s)))
    deadline = bisect(lambda t: jnp.sum(needed(t)) <= total, t_lo, t_hi, 60, log=False)
    beta = needed(deadline)
    return beta * jnp.minimum(1.0, total / jnp.sum(beta))


def allocate(problem: Problem, bits=None, iterations: int = 10) -> tuple[Allocation, dict]:
    """BCD allocation; ``bits=None`` picks the smallest uniform bits meeting the budget.

    Returns:
      ``(allocation, diagnostics)`` with ``objective``, ``feasible`` and ``history`` (the
      objective after each iteration, ``[iterations + 1]``, starting from equal bandwidth and full
      power).
    """
    s = problem.num_devices
    bits = smallest_bits(problem) if bits is None else jnp.asarray(bits, jnp.float32)
    start = Allocation(
        power_w=jnp.full((s,), problem.params.p_max_w),
        bandwidth_hz=jnp.full((s,), problem.params.bandwidth_hz / s),
        bits=bits,
    )
    value = lambda al: evaluate(problem, al)["objective"]  # noqa: E731

    def keep_better(new, old):
        better = value(new) <= value(old)
        return jax.tree.map(lambda n, o: jnp.where(better, n, o), new, old)

    def iteration(current, _):
        beta = equal_finish_bandwidth(problem, current.power_w, bits)
        current = keep_better(Allocation(current.power_w, beta, bits), current)
        powered, _ = polish(problem, current.bandwidth_hz, bits)
        current = keep_better(powered, current)
        return current, value(current)

    final, history = jax.lax.scan(iteration, start, None, length=iterations)
    return final, {
        "objective": value(final),
        "feasible": feasible(problem, final),
        "history": jnp.concatenate([value(start)[None], history]),
    }
