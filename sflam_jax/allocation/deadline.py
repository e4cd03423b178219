"""The exact best deadline and powers for a fixed bandwidth split and bits (SPEC section 4).

For a split beta and bits b, each device transmits for all the time the deadline T leaves it, at
the power that just moves its bits, and ``F(T, beta)`` is convex in T, so golden-section search
finds T. Shared by the solvers that search over splits (``pgd``, ``bcd``) and the integer
refinement of bits (``refine``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sflam_jax.allocation.problem import Allocation, Links, Problem
from sflam_jax.allocation.search import golden_section


class Split:
    """Closed forms for a fixed bandwidth split and bits (``[S]`` arrays)."""

    def __init__(self, problem: Problem, bandwidth_hz, bits):
        self.problem = problem
        self.beta = bandwidth_hz
        self.links = Links(problem, bits)
        # Fixed for the split; computed once, outside the deadline search.
        self.down_time = self.links.down_time(bandwidth_hz)

    def uplink_time(self, deadline):
        """Each device sends for all the time the deadline leaves it."""
        return deadline - self.links.a - self.down_time

    def fastest_deadline(self):
        """T_min: the slowest device's finish at full power."""
        return jnp.max(self.links.finish(self.beta, self.links.p_max))

    def powers(self, deadline):
        power = self.links.transmit_power(self.uplink_time(deadline), self.beta)
        return jnp.minimum(power, self.links.p_max)

    def objective(self, deadline):
        uplink = self.links.transmit_energy(self.uplink_time(deadline), self.beta)
        energy = jnp.sum(self.links.c + uplink)
        pr = self.problem
        return pr.w_t * deadline / pr.t_ref + pr.w_e * energy / pr.e_ref

    def best_deadline(self, iters: int):
        """Golden-section search of the convex ``F(T)`` on ``[T_min, F(T_min) T_ref / w_T]``."""
        t_min = self.fastest_deadline()
        t_hi = jnp.maximum(self.objective(t_min) * self.problem.t_ref / self.problem.w_t, t_min)

        lo, hi = golden_section(self.objective, t_min, t_hi, iters)
        # The optimum can sit exactly at T_min, which golden section never evaluates.
        candidates = jnp.stack([t_min, lo, hi])
        return candidates[jnp.argmin(jax.vmap(self.objective)(candidates))]


def polish(problem: Problem, bandwidth_hz, bits, iters: int = 80) -> tuple[Allocation, jax.Array]:
    """Exact best powers and deadline for a fixed bandwidth split and bits.

    Returns ``(allocation, deadline_s)``: every device finishes at the deadline, the slowest one
    possibly at full power.
    """
    split = Split(problem, bandwidth_hz, bits)
    deadline = split.best_deadline(iters)
    allocation = Allocation(power_w=split.powers(deadline), bandwidth_hz=bandwidth_hz, bits=bits)
    return allocation, deadline
