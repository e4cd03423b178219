"""The joint problem: per-device cuts and server shares with SFLAM's power, bandwidth and bits
(SPEC sections 4 and 6.2, beyond both papers).

    minimise   w_T T_round / T_ref + w_E E_round / E_ref
    subject to the section 4 constraints on power, bandwidth and bits (learning budget included),
               sum_k f_k^S <= F_server, and M(l_k) <= M_k^max (memory)

with ``T_ref``, ``E_ref`` at the config's cut, equal server shares, equal bandwidth, full power and
32 bits. Block coordinate descent in JAX, jit-compiled and ``vmap``-able:

- links (power, bandwidth, bits) for fixed cuts and shares: at fixed cuts and shares a device's
  round keeps SFLAM's form ``T = A + D / r_up + H / r_dn``, ``E = C + p D / r_up`` (``A``: its
  compute and its server time ``tau 3 B F_s(l) / f^S``; ``D``, ``H``: its cut's traffic), so
  ``pgd`` solves it with free bits, integer refinement included;
- cuts and shares for fixed links: for a deadline T each device's share at cut l is the least that
  finishes by T, ``tau 3 B F_s(l) / (T - T_dev(l))``; a price on server compute (bisection until
  the shares fit ``F_server``) picks every device's cut of least ``E(l) + price * share(l)``, and
  a grid of deadlines keeps the best objective.

A block's result is kept only when it lowers the objective. Two starts, the best end kept: the
config's cut with equal shares (so the result is never worse than SFLAM's allocator at a fixed
cut) and ESFL's optimum (``cuts.exact``; never worse than it either, both at the smallest bits
that meet the budget). With bits fixed (``allocate(..., bits=...)``, the protocol's
``allocation.optimize_bits = False``) the links block chooses power and bandwidth only and both
starts use those bits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sflam_jax import quant
from sflam_jax.allocation import cuts, pgd
from sflam_jax.allocation.problem import (
    Allocation,
    BitsSpec,
    Problem,
    Weights,
    evaluate,
    smallest_bits,
)
from sflam_jax.allocation.search import bisect
from sflam_jax.wireless.costs import Workload, round_loads


@dataclasses.dataclass(frozen=True)
class JointOptions:
    """Block coordinate descent settings.

    Attributes:
      rounds: alternations of the two blocks per start.
      deadlines: grid of deadlines of the cuts-and-shares block.
      price_iters: bisection steps of the server-compute price.
      pgd: the links block's settings.
    """

    rounds: int = 3
    deadlines: int = 48
    price_iters: int = 40
    pgd: pgd.PGDOptions = pgd.PGDOptions(steps=400)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _AtCuts:
    """Each device's split at its cut (``[S]``), the ``load_data`` of the links block."""

    client_flops: jax.Array
    server_s: jax.Array
    client_params: jax.Array
    values: jax.Array


def _cut_loads(devices, steps, up_bits, workload, params, down_bits, at: _AtCuts) -> dict:
    """SFLAM's per-device ``A, C, D, H`` at each device's own cut and server share: SFL-V1's
    round formula (``wireless.costs.round_loads``) on each device's own split, the server's part
    at its share."""
    own = Workload(
        client_flops=at.client_flops,
        server_flops=0.0,
        values_per_sample=at.values,
        client_params=at.client_params,
        batch_size=workload.batch_size,
    )
    loads = round_loads(devices, steps, up_bits, own, params, down_bits)
    return {
        "compute_s": loads["device_s"] + at.server_s,
        "compute_j": loads["compute_j"],
        "up_bits": loads["up_bits"],
        "down_bits": loads["down_bits"],
    }


def _pick(matrix, cut):
    return jnp.take_along_axis(matrix, cut[:, None], axis=1)[:, 0]


class _Joint:
    """One instance: the cut problem, its data weights and objective, the references."""

    def __init__(
        self, problem: cuts.CutProblem, rho, weights: Weights, workload: Workload, cut, bits=None
    ):
        self.problem, self.rho, self.weights, self.workload = problem, rho, weights, workload
        self.bits = bits  # [S] fixed cut-layer bits, or None: the links block chooses them
        s = problem.num_devices
        p = problem.params
        self.equal = jnp.full((s,), p.server_flops / s)
        ref = cuts.CutAllocation(
            cut=jnp.full((s,), cut, jnp.int32),
            server_flops=self.equal,
            power_w=jnp.full((s,), p.p_max_w),
            bandwidth_hz=jnp.full((s,), p.bandwidth_hz / s),
            bits=jnp.full((s,), float(quant.FLOAT_BITS)),
        )
        costs = cuts.round_costs(problem, ref)
        self.t_ref, self.e_ref = costs["round_latency_s"], costs["round_energy_j"]
        # The problem SFLAM's allocators see at fixed cuts; its load data is set per block.
        self.links = Problem(
            devices=problem.devices,
            steps=problem.steps,
            rho=rho,
            t_ref=self.t_ref,
            e_ref=self.e_ref,
            w_t=jnp.float32(weights.w_t),
            w_e=jnp.float32(weights.w_e),
            eps_q=jnp.float32(weights.eps_q),
            workload=workload,
            params=p,
            weights=BitsSpec(
                weights.bits_min, weights.bits_max, weights.value_range, problem.down_bits
            ),
            loads=_cut_loads,
        )

    def objective(self, allocation: cuts.CutAllocation):
        costs = cuts.round_costs(self.problem, allocation)
        return (
            self.links.w_t * costs["round_latency_s"] / self.t_ref
            + self.links.w_e * costs["round_energy_j"] / self.e_ref
        )

    def at_cuts(self, cut, shares) -> _AtCuts:
        s = self.problem.num_devices
        ones = jnp.ones((s,))
        per = cuts.per_cut_times(self.problem, ones, ones, ones)  # rate-free parts only
        t = self.problem.table
        return _AtCuts(
            client_flops=t.client_flops[cut],
            server_s=_pick(per["server_work"], cut) / shares,
            client_params=t.client_params[cut],
            values=t.values[cut],
        )

    def links_block(self, allocation: cuts.CutAllocation, options: JointOptions):
        """Power, bandwidth and bits (unless fixed) for the allocation's cuts and shares (pgd)."""
        problem = self.links.replace(
            load_data=self.at_cuts(allocation.cut, allocation.server_flops)
        )
        links, _ = pgd.allocate(problem, self.bits, options.pgd)
        return allocation.replace(
            power_w=links.power_w, bandwidth_hz=links.bandwidth_hz, bits=links.bits
        )

    def cuts_block(self, allocation: cuts.CutAllocation, options: JointOptions):
        """Cuts and shares for the allocation's links: a grid of deadlines, each with the
        price on server compute that makes the shares fit."""
        pr = self.problem
        per = cuts.per_cut_times(pr, allocation.power_w, allocation.bandwidth_hz, allocation.bits)
        allowed = cuts.allowed_or_least(pr)
        device_s, work, energy = per["device_s"], per["server_work"], per["energy_j"]
        capacity = jnp.float32(pr.params.server_flops)
        fastest = jnp.max(jnp.min(jnp.where(allowed, device_s, jnp.inf), axis=1))
        s = pr.num_devices
        slowest = jnp.max(jnp.min(jnp.where(allowed, device_s + work * s / capacity, jnp.inf), 1))
        grid = fastest + (slowest - fastest) * jnp.geomspace(1e-4, 1.0, options.deadlines)

        def at_deadline(deadline):
            need = cuts.least_shares(device_s, work, allowed, deadline)

            def choose(price):
                return jnp.argmin(jnp.where(jnp.isfinite(need), energy + price * need, jnp.inf), 1)

            def fits(price):
                return jnp.sum(_pick(need, choose(price))) <= capacity

            top = jnp.max(jnp.where(jnp.isfinite(need), energy, 0.0)) / jnp.maximum(
                jnp.min(jnp.where(jnp.isfinite(need), need, jnp.inf)), 1e-30
            )
            price = bisect(fits, jnp.float32(0.0), 1e6 * top + 1.0, options.price_iters, log=False)
            cut = jnp.where(fits(0.0), choose(0.0), choose(price))
            least = _pick(need, cut)
            shares = least * capacity / jnp.sum(least)
            candidate = allocation.replace(cut=cut, server_flops=shares)
            ok = jnp.all(jnp.isfinite(least)) & (jnp.sum(least) <= capacity * (1 + 1e-6))
            return candidate, jnp.where(ok, self.objective(candidate), jnp.inf)

        candidates, values = jax.vmap(at_deadline)(grid)
        best = jnp.argmin(values)
        return jax.tree.map(lambda x: x[best], candidates)

    def descend(self, start: cuts.CutAllocation, options: JointOptions):
        """Alternating blocks from ``start``, each kept only when it lowers the objective."""

        def keep_better(new, old):
            better = self.objective(new) < self.objective(old)
            return jax.tree.map(lambda n, o: jnp.where(better, n, o), new, old)

        def round_(current, _):
            current = keep_better(self.links_block(current, options), current)
            current = keep_better(self.cuts_block(current, options), current)
            return current, self.objective(current)

        final, history = jax.lax.scan(round_, start, None, length=options.rounds)
        return final, history


def allocate(
    problem: cuts.CutProblem,
    rho: jax.Array,
    weights: Weights,
    workload: Workload,
    cut: int,
    options: JointOptions = JointOptions(),
    bits: jax.Array | None = None,
) -> tuple[cuts.CutAllocation, dict]:
    """The joint allocation (module docstring).

    Args:
      problem: the cut problem (devices, memory limits, steps, candidate cuts).
      rho: ``[S]`` data weights (the learning budget's).
      weights: objective weights, bit range and budget (``allocation.*``).
      workload: the split model's sizes (``values_per_sample``: Gamma of the budget, the same at
        every cut of a ViT).
      cut: index into the candidates of the config's cut (the references and a start).
      options: descent settings.
      bits: ``[S]`` cut-layer bits kept fixed (the links block then chooses power and bandwidth
        only, as SFLAM's allocators do with fixed bits), or None: free bits, the starts at the
        smallest bits that meet the learning budget.

    Returns:
      ``(CutAllocation, diagnostics)``: ``objective``, ``quant_error``, ``feasible`` (budget
      and memory), ``infeasible_device`` (the first device whose memory fits no cut; -1: none),
      ``history`` (``[2, rounds]``, the objective of each start after each round).
    """
    joint = _Joint(problem, rho, weights, workload, cut, bits)
    s = problem.num_devices
    p = problem.params
    smallest = smallest_bits(joint.links) if bits is None else jnp.asarray(bits, jnp.float32)
    fixed = cuts.CutAllocation(
        cut=jnp.full((s,), cut, jnp.int32),
        server_flops=joint.equal,
        power_w=jnp.full((s,), p.p_max_w),
        bandwidth_hz=jnp.full((s,), p.bandwidth_hz / s),
        bits=smallest,
    )
    esfl, diag = cuts.exact(problem, smallest)
    starts = jax.tree.map(lambda a, b: jnp.stack([a, b]), fixed, esfl)
    ends, history = jax.vmap(lambda start: joint.descend(start, options))(starts)
    values = jax.vmap(joint.objective)(ends)
    best = jnp.argmin(values)
    final = jax.tree.map(lambda x: x[best], ends)
    links = Allocation(final.power_w, final.bandwidth_hz, final.bits)
    used = jnp.sum(rho * quant.error_proxy(final.bits, workload.budget_values, weights.value_range))
    return final, {
        "objective": values[best],
        "quant_error": used,
        "feasible": diag["feasible"] & (used <= weights.eps_q * (1 + 1e-6)),
        "infeasible_device": diag["infeasible_device"],
        "history": history,
        "links_objective": evaluate(
            joint.links.replace(load_data=joint.at_cuts(final.cut, final.server_flops)), links
        )["objective"],
    }
