"""Block coordinate descent, the paper's scheme (SPEC section 4), in JAX.

Blocks, visited in turn for a fixed number of iterations:

- bits: the smallest uniform bits that meet the learning budget (the objective only grows with
  bits, so this block is solved once);
- bandwidth, for the current powers: equal finish times, ``T_k(beta_k) = T`` for every device with
  ``sum_k beta_k = B`` (bisection on T, and on each ``beta_k``);
- power, for the current bandwidth: for a fixed split the problem is one-dimensional and convex in
  the deadline (each device sends at the least power that meets it), solved exactly by
  ``deadline.polish``. The paper approximates this block by successive convex approximation; the
  exact solve is at least as good.

With free bits the integer bits are then refined by exchange moves with exact re-solves
(``allocation.refine``; not with subchannels, whose split stays whole).

A block's result is kept only when it does not raise the objective, so the objective never
increases from one iteration to the next; ``diagnostics["history"]`` records it.

With ``subchannels = N > 0`` the band is N equal subchannels: the continuous split is rounded to
whole subchannels (largest remainders, at least one each) and swap matching then moves one
subchannel at a time from one device to another, the move that lowers the objective most, until
no move helps. (Channel gains are flat over the band in SPEC section 3, so exchanging two
subchannels between devices changes nothing; a move is a swap with an empty slot.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sflam_jax.allocation.deadline import polish
from sflam_jax.allocation.problem import (
    LN2,
    Allocation,
    Links,
    Problem,
    evaluate,
    feasible,
    smallest_bits,
)
from sflam_jax.allocation.refine import RefineOptions, improve
from sflam_jax.allocation.search import bisect

DEFAULT_REFINE = RefineOptions()


def equal_finish_bandwidth(problem: Problem, power_w, bits) -> jax.Array:
    """Bandwidth split under which every device finishes at the same time with its power."""
    links = Links(problem, bits)
    g, total = links.g, links.bw
    s = problem.num_devices

    def finish(beta):
        return links.finish(beta, power_w)

    def needed(deadline):
        lo = jnp.full_like(g, total * 1e-9)
        hi = jnp.full_like(g, total)
        return bisect(lambda b: finish(b) <= deadline, lo, hi, 50, log=True)

    t_lo = jnp.max(links.a + (links.d / power_w + links.h / links.p_srv) * links.n0 * LN2 / g)
    t_hi = jnp.max(finish(jnp.full_like(g, total / s)))
    deadline = bisect(lambda t: jnp.sum(needed(t)) <= total, t_lo, t_hi, 60, log=False)
    beta = needed(deadline)
    return beta * jnp.minimum(1.0, total / jnp.sum(beta))


def round_to_subchannels(bandwidth_hz, total_hz: float, subchannels: int) -> jax.Array:
    """Whole subchannels per device: largest remainders, at least one each (needs N >= S)."""
    share = bandwidth_hz / total_hz * subchannels
    counts = jnp.maximum(jnp.floor(share), 1.0)
    left = subchannels - jnp.sum(counts)
    rank = jnp.argsort(jnp.argsort(-(share - jnp.floor(share))))
    return counts + (rank < left).astype(counts.dtype)


def swap_matching(problem: Problem, counts, bits, max_moves: int) -> tuple[jax.Array, jax.Array]:
    """Greedy subchannel moves between devices while the objective falls.

    Returns ``(counts, moves made)``; each device keeps at least one subchannel.
    """
    s = problem.num_devices
    total = problem.params.bandwidth_hz
    unit = total / jnp.sum(counts)

    def value(c):
        allocation, _ = polish(problem, c * unit, bits)
        return evaluate(problem, allocation)["objective"]

    src, dst = jnp.meshgrid(jnp.arange(s), jnp.arange(s), indexing="ij")
    src, dst = src.ravel(), dst.ravel()
    moves = jax.nn.one_hot(dst, s) - jax.nn.one_hot(src, s)  # [S*S, S]

    def body(state):
        counts, current, n, _ = state
        candidates = counts + moves
        legal = (src != dst) & jnp.all(candidates >= 1, axis=-1)
        values = jnp.where(legal, jax.vmap(value)(candidates), jnp.inf)
        best = jnp.argmin(values)
        better = values[best] < current * (1 - 1e-7)
        return (
            jnp.where(better, candidates[best], counts),
            jnp.where(better, values[best], current),
            n + better.astype(jnp.int32),
            better,
        )

    counts, _, n, _ = jax.lax.while_loop(
        lambda st: st[3] & (st[2] < max_moves), body, (counts, value(counts), 0, True)
    )
    return counts, n


def allocate(
    problem: Problem,
    bits=None,
    iterations: int = 10,
    subchannels: int = 0,
    max_moves: int = 1000,
    refine: RefineOptions = DEFAULT_REFINE,
) -> tuple[Allocation, dict]:
    """BCD allocation; ``bits=None`` picks the smallest uniform bits meeting the budget.

    Args:
      problem: one instance (``[S]`` arrays).
      bits: fixed ``[S]`` bits, or None.
      iterations: BCD iterations over the bandwidth and power blocks.
      subchannels: 0 for a continuous split, else N >= S equal subchannels with swap matching.
      max_moves: limit on swap-matching moves.
      refine: the integer refinement when ``bits`` is None (continuous split only).

    Returns:
      ``(allocation, diagnostics)`` with ``objective``, ``feasible``, ``history`` (the
      objective after each iteration, ``[iterations + 1]``, starting from equal bandwidth and full
      power; before the bits' refinement) and ``moves`` (swap-matching moves; 0 when continuous).
    """
    s = problem.num_devices
    free = bits is None
    bits = smallest_bits(problem) if free else jnp.asarray(bits, jnp.float32)
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
    moves = jnp.zeros((), jnp.int32)
    if subchannels:
        if subchannels < s:
            raise ValueError(f"bcd subchannels={subchannels} must be >= the {s} devices")
        total = problem.params.bandwidth_hz
        counts = round_to_subchannels(final.bandwidth_hz, total, subchannels)
        counts, moves = swap_matching(problem, counts, bits, max_moves)
        final, _ = polish(problem, counts * (total / subchannels), bits)
    elif free:
        final, _ = improve(problem, final, refine)
    return final, {
        "objective": value(final),
        "feasible": feasible(problem, final),
        "history": jnp.concatenate([value(start)[None], history]),
        "moves": moves,
    }
