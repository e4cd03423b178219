"""Baseline allocations: equal bandwidth with full power (SPEC section 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sflam_jax.allocation.problem import Allocation, Problem, evaluate, feasible, smallest_bits


def _full_power_equal_share(problem: Problem, bits) -> tuple[Allocation, dict]:
    s = problem.num_devices
    shape = problem.steps.shape
    allocation = Allocation(
        power_w=jnp.full(shape, problem.params.p_max_w),
        bandwidth_hz=jnp.full(shape, problem.params.bandwidth_hz / s),
        bits=jnp.broadcast_to(jnp.asarray(bits, jnp.float32), shape),
    )
    return allocation, {
        "objective": evaluate(problem, allocation)["objective"],
        "feasible": feasible(problem, allocation),
    }


def equal(problem: Problem, bits: jax.Array | None = None) -> tuple[Allocation, dict]:
    """Equal bandwidth, full power; bits as given, else the smallest uniform bits within budget."""
    return _full_power_equal_share(problem, smallest_bits(problem) if bits is None else bits)


def max_power(problem: Problem, bits: jax.Array | None = None) -> tuple[Allocation, dict]:
    """Equal bandwidth, full power and the largest allowed bits (no optimisation at all)."""
    if bits is None:
        bits = jnp.full(problem.steps.shape, float(problem.weights.bits_max))
    return _full_power_equal_share(problem, bits)
