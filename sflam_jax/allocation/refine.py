"""Integer refinement of the cut-layer bits: exchange moves with exact re-solves (SPEC section 4).

A solver with free bits solves a relaxation and rounds the bits up, which keeps the learning
budget but can leave a better integer point next to it. From a feasible allocation, each sweep
considers, for every device i, the moves "lower device i one level, then raise other devices one
level at a time until the budget ``sum_k rho_k delta(b_k) <= eps_Q`` holds again" (the cheapest
per budget regained first, or the one regaining the most first) and "raise device i one level,
then lower the others, the most gain per budget used first, while the budget holds".
The moves are ranked by an estimate at the current bandwidth split (the exact best deadline and
powers for that split, ``deadline.polish``, per single-device change, added up), the ``candidates``
best (and the current bits) are re-solved exactly for power and bandwidth (the nested bisection
of ``exact`` in float32, inside the graph), and the best is kept if it lowers the objective.
Sweeps stop when no move helps. ``improve`` runs the moves from the solver's point and from the
smallest uniform bits that meet the budget, and keeps the better end. Everything is jit-compiled and
``vmap``-able; the result is never worse than the solver's point.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sflam_jax import quant
from sflam_jax.allocation import exact
from sflam_jax.allocation.deadline import polish
from sflam_jax.allocation.problem import Allocation, Problem, evaluate, smallest_bits


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """Exchange-move settings.

    Attributes:
      sweeps: most sweeps (each accepts at most one move); 0 turns the refinement off.
      candidates: moves re-solved exactly per sweep.
      estimate_iters: golden-section steps of each move's estimate.
      max_changes: most devices raised (or lowered) to repair (or spend) the budget in one move.
    """

    sweeps: int = 12
    candidates: int = 6
    estimate_iters: int = 30
    max_changes: int = 16


def resolve(problem: Problem, bits) -> tuple[Allocation, jax.Array]:
    """The best power and bandwidth for fixed ``bits`` (float32 nested bisection) and the
    objective there."""
    beta, power, _ = exact.solve_fixed_bits(problem, bits, jnp.float32)
    allocation = Allocation(power_w=power, bandwidth_hz=beta, bits=bits)
    return allocation, evaluate(problem, allocation)["objective"]


def refine(
    problem: Problem, start: Allocation, options: RefineOptions = RefineOptions()
) -> tuple[Allocation, jax.Array]:
    """Exchange moves from ``start`` (integer bits meeting the budget; module docstring).

    Returns ``(allocation, objective)``, the best point seen (``start`` if no move helps).
    """

    wts = problem.weights
    s = problem.num_devices
    eye = jnp.eye(s, dtype=jnp.float32)
    gamma = problem.workload.budget_values

    def weighted_delta(bits):
        return problem.rho * quant.error_proxy(bits, gamma, wts.value_range)

    def estimate(beta, bits):
        allocation, _ = polish(problem, beta, bits, options.estimate_iters)
        return evaluate(problem, allocation)["objective"]

    def repair(new, i, raise_cost, by_cost: bool):
        """Raise devices other than i one level at a time until the budget holds: the cheapest
        per budget regained (``by_cost``) or the one regaining the most."""

        def raise_one(_, carry):
            new, cost = carry
            over = jnp.sum(weighted_delta(new)) > problem.eps_q
            regained = weighted_delta(new) - weighted_delta(new + 1.0)
            can = (new < wts.bits_max) & (jnp.arange(s) != i) & (regained > 0)
            score = jnp.maximum(raise_cost, 0.0) / regained if by_cost else -regained
            score = jnp.where(can, score, jnp.inf)
            j = jnp.argmin(score)
            step = over & jnp.isfinite(score[j])
            return new + jnp.where(step, eye[j], 0.0), cost + jnp.where(step, raise_cost[j], 0.0)

        changes = min(s, options.max_changes)
        return jax.lax.fori_loop(0, changes, raise_one, (new, jnp.float32(0.0)))

    def spend(new, j, lower_gain):
        """Lower devices other than j one level at a time, the most gain per budget used first,
        while the budget holds."""

        def lower_one(_, carry):
            new, gain = carry
            used = weighted_delta(new - 1.0) - weighted_delta(new)
            room = problem.eps_q - jnp.sum(weighted_delta(new))
            can = (new > wts.bits_min) & (jnp.arange(s) != j) & (used <= room)
            score = jnp.where(can, jnp.maximum(lower_gain, 0.0) / jnp.maximum(used, 1e-30), -1.0)
            k = jnp.argmax(score)
            step = can[k]
            return new - jnp.where(step, eye[k], 0.0), gain + jnp.where(step, lower_gain[k], 0.0)

        changes = min(s, options.max_changes)
        return jax.lax.fori_loop(0, changes, lower_one, (new, jnp.float32(0.0)))

    def moves(bits, raise_cost, lower_gain):
        """``[3 S]`` moves (bits, estimated change, allowed): device i down then repaired by cost
        or by budget, and device j up then the budget spent on lowering others."""

        def down(i, by_cost):
            new, cost = repair(bits - eye[i], i, raise_cost, by_cost)
            ok = (bits[i] > wts.bits_min) & (jnp.sum(weighted_delta(new)) <= problem.eps_q)
            return new, cost - lower_gain[i], ok

        def up(j):
            new, gain = spend(bits + eye[j], j, lower_gain)
            ok = (bits[j] < wts.bits_max) & (gain > 0)
            ok &= jnp.sum(weighted_delta(new)) <= problem.eps_q
            return new, raise_cost[j] - gain, ok

        index = jnp.arange(s)
        parts = [
            jax.vmap(lambda i: down(i, True))(index),
            jax.vmap(lambda i: down(i, False))(index),
            jax.vmap(up)(index),
        ]
        return [jnp.concatenate(x) for x in zip(*parts, strict=True)]

    def sweep(carry):
        bits, allocation, objective, _, count = carry
        beta = allocation.bandwidth_hz
        base = estimate(beta, bits)
        higher = jax.vmap(lambda e: estimate(beta, bits + e))(eye)
        lower = jax.vmap(lambda e: estimate(beta, jnp.maximum(bits - e, wts.bits_min)))(eye)
        raise_cost = jnp.where(bits < wts.bits_max, higher - base, jnp.inf)
        lower_gain = base - lower
        moved, change, ok = moves(bits, raise_cost, lower_gain)
        change = jnp.where(ok, change, jnp.inf)
        k = min(options.candidates, 3 * s)
        _, top = jax.lax.top_k(-change, k)
        # The current bits are re-solved too (a start that is not yet exact for its bits).
        candidates = jnp.concatenate([bits[None], moved[top]])
        tried, values = jax.vmap(lambda b: resolve(problem, b))(candidates)
        values = jnp.where(
            jnp.isfinite(jnp.concatenate([jnp.zeros(1), change[top]])), values, jnp.inf
        )
        best = jnp.argmin(values)
        better = values[best] < objective * (1.0 - 1e-6)
        pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731
        chosen = jax.tree.map(lambda x: x[best], tried)
        return (
            pick(candidates[best], bits),
            jax.tree.map(pick, chosen, allocation),
            pick(values[best], objective),
            better,
            count + 1,
        )

    start_objective = evaluate(problem, start)["objective"]
    carry = (start.bits, start, start_objective, jnp.bool_(options.sweeps > 0), jnp.int32(0))
    _, allocation, objective, _, _ = jax.lax.while_loop(
        lambda c: c[3] & (c[4] < options.sweeps), sweep, carry
    )
    return allocation, objective


def improve(
    problem: Problem, allocation: Allocation, options: RefineOptions = RefineOptions()
) -> tuple[Allocation, jax.Array]:
    """The better of ``refine`` from ``allocation`` and from the smallest uniform bits meeting
    the budget; ``(allocation, objective)``."""
    if options.sweeps == 0:
        return allocation, evaluate(problem, allocation)["objective"]
    s = problem.num_devices
    uniform = Allocation(
        power_w=jnp.full((s,), problem.params.p_max_w),
        bandwidth_hz=jnp.full((s,), problem.params.bandwidth_hz / s),
        bits=smallest_bits(problem),
    )  # re-solved exactly in the first sweep
    starts = jax.tree.map(lambda a, b: jnp.stack([a, b]), allocation, uniform)
    ends, values = jax.vmap(lambda start: refine(problem, start, options))(starts)
    best = jnp.argmin(values)
    return jax.tree.map(lambda x: x[best], ends), values[best]
