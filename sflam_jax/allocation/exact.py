"""Global optimum of the allocation problem for fixed bits, by nested bisection (the test oracle).

For fixed bits and a deadline T, device k's uplink energy is smallest when it transmits for all the
time its deadline leaves, ``t_k = T - A_k - H_k / r_dn(beta_k)``, at the power that moves ``D_k``
bits in ``t_k``:

    e_k(beta_k; T) = (N0 / G_k) v (2^(D_k / v) - 1),   v = t_k beta_k

a perspective of an exponential, convex and decreasing in ``beta_k`` (SPEC section 4). So:

- inner: for a bandwidth price lambda, ``beta_k(lambda)`` solves ``e_k'(beta) = -lambda`` on
  ``[beta_min_k(T), B]`` (bisection on log beta); ``beta_min_k(T)`` is the least bandwidth with
  which the device meets T at full power;
- middle: bisection on log lambda until ``sum_k beta_k = B``;
- outer: ``F(T) = w_T T / T_ref + w_E E*(T) / E_ref`` is convex in T (E* is the value function of a
  convex problem in its right-hand side), minimised by golden-section search on
  ``[T_min, T_hi]``, T_min the least feasible deadline and ``T_hi = F(T_eq) T_ref / w_T``.

Runs in float64. ``allocate_bits_search`` adds the best integer bits by exhaustive search (small S).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax.allocation.problem import (
    LN2,
    Allocation,
    Links,
    Problem,
    evaluate,
    feasible,
    quant_budget_used,
)
from sflam_jax.allocation.search import bisect, golden_section


class _Devices(Links):
    """The links in ``dtype`` (float64 for the oracle), with the bandwidth searches of the nested
    bisection."""

    def __init__(self, problem: Problem, bits, dtype=jnp.float64):
        super().__init__(problem, bits, dtype)
        wide = dtype == jnp.float64
        # The price bracket's low end, relative to its high end (above the dtype's tiniest).
        self.price_floor = 1e-60 if wide else 1e-30
        # Bisection steps: float64 runs to its resolution; float32 stops near its own (each
        # bracket spans under 2^7 in log space, so 32 steps reach 1e-8 relative).
        self.steps = {"beta_min": 45, "beta": 40, "price": 50, "t_min": 60, "golden": 40}
        if not wide:
            self.steps = {"beta_min": 32, "beta": 30, "price": 32, "t_min": 40, "golden": 30}

    def uplink_time(self, beta, deadline):
        return deadline - self.a - self.down_time(beta)

    def fastest_finish(self, beta):
        return self.finish(beta, self.p_max)

    def beta_min(self, deadline):
        """Least bandwidth meeting ``deadline`` at full power (inf where even B cannot)."""
        lo = jnp.full_like(self.g, self.bw * 1e-12)
        hi = jnp.full_like(self.g, self.bw)
        beta = bisect(
            lambda b: self.fastest_finish(b) <= deadline, lo, hi, self.steps["beta_min"], log=True
        )
        return jnp.where(self.fastest_finish(hi) <= deadline, beta, jnp.inf)

    def energy(self, beta, deadline):
        return self.transmit_energy(self.uplink_time(beta, deadline), beta)

    def power(self, beta, deadline):
        return self.transmit_power(self.uplink_time(beta, deadline), beta)

    def energy_slope(self, beta, deadline):
        """d e_k / d beta_k (negative), with the uplink time's own dependence on beta."""
        t = self.uplink_time(beta, deadline)
        s = self.p_srv * self.g / (beta * self.n0)
        r_dn = self.rate(beta, self.p_srv)
        dr_dn = (jnp.log1p(s) - s / (1.0 + s)) / LN2
        u = t + beta * self.h * dr_dn / r_dn**2
        x = self.d / (t * beta)
        return self.n0 / self.g * u * (jnp.expm1(LN2 * x) - x * LN2 * jnp.exp(LN2 * x))

    def bandwidth_at_price(self, price, beta_lo, deadline):
        """argmin_beta e_k(beta) + price * beta on ``[beta_lo, B]``."""
        hi = jnp.full_like(beta_lo, self.bw)
        beta = bisect(
            lambda b: self.energy_slope(b, deadline) + price >= 0,
            beta_lo,
            hi,
            self.steps["beta"],
            log=True,
        )
        at_lo = self.energy_slope(beta_lo, deadline) + price >= 0
        at_hi = self.energy_slope(hi, deadline) + price <= 0
        return jnp.where(at_lo, beta_lo, jnp.where(at_hi, hi, beta))

    def bandwidth_at_deadline(self, deadline):
        """Energy-optimal bandwidth split for ``deadline`` (needs ``sum beta_min <= B``)."""
        beta_lo = self.beta_min(deadline)
        price_hi = jnp.max(-self.energy_slope(beta_lo, deadline))
        total = lambda price: jnp.sum(self.bandwidth_at_price(price, beta_lo, deadline))  # noqa: E731
        price = bisect(
            lambda q: total(q) <= self.bw,
            price_hi * self.price_floor,
            price_hi,
            self.steps["price"],
            log=True,
        )
        return self.bandwidth_at_price(price, beta_lo, deadline)


def solve_fixed_bits(problem: Problem, bits, dtype=jnp.float64):
    """``(bandwidth, power, deadline)`` of the optimum for fixed bits, in ``dtype`` (one
    instance; float32 runs inside a jitted graph without ``jax.enable_x64``)."""
    dev = _Devices(problem, bits, dtype)
    t_ref = jnp.asarray(problem.t_ref, dtype)
    e_ref = jnp.asarray(problem.e_ref, dtype)
    s = dev.g.shape[-1]

    # The least feasible deadline: sum_k beta_min_k(T) <= B.
    t_eq = jnp.max(dev.fastest_finish(jnp.full_like(dev.g, dev.bw / s)))
    t_floor = jnp.max(dev.a + (dev.d / dev.p_max + dev.h / dev.p_srv) * dev.n0 * LN2 / dev.g)
    t_min = bisect(
        lambda t: jnp.sum(dev.beta_min(t)) <= dev.bw, t_floor, t_eq, dev.steps["t_min"], log=False
    )

    def objective(deadline):
        beta = dev.bandwidth_at_deadline(deadline)
        energy = jnp.sum(dev.c + dev.energy(beta, deadline))
        return problem.w_t * deadline / t_ref + problem.w_e * energy / e_ref

    t_hi = jnp.maximum(objective(t_eq) * t_ref / problem.w_t, t_eq)

    # float64: 40 steps shrink the bracket to 4e-9 of its width: a golden-section search cannot
    # resolve a minimum more finely than sqrt(float64 eps) ~ 1e-8 anyway (the objective is flat
    # there), and the objective's error is quadratic in the deadline's (60 steps changed no
    # objective by more than float32 rounding on 500 test instances). float32: 30 steps, 5e-7.
    lo, hi = golden_section(objective, t_min, t_hi, dev.steps["golden"])
    deadline = 0.5 * (lo + hi)
    beta = dev.bandwidth_at_deadline(deadline)
    power = jnp.minimum(dev.power(beta, deadline), dev.p_max)
    return beta, power, deadline


def _solve_any(problem: Problem, bits):
    # Leading axes of the problem are instances.
    fn = solve_fixed_bits
    for _ in range(problem.steps.ndim - 1):
        fn = jax.vmap(fn)
    return fn(problem, bits)


_solve_jit = jax.jit(_solve_any)


def allocate(problem: Problem, bits: jax.Array) -> tuple[Allocation, dict]:
    """Global optimum of power and bandwidth for the given bits (float64 inside).

    Args:
      problem: one instance (``[S]`` arrays) or a batch (``[N, S]``, solved in one vmapped call).
      bits: ``[S]`` (or ``[N, S]``) cut-layer bits, fixed.

    Returns:
      ``(allocation, diagnostics)``; diagnostics hold ``objective``, ``deadline_s`` and
      ``feasible``.
    """
    with jax.enable_x64(True):
        beta, power, deadline = _solve_jit(problem, jnp.broadcast_to(bits, problem.steps.shape))
        allocation = Allocation(
            power_w=power.astype(jnp.float32),
            bandwidth_hz=beta.astype(jnp.float32),
            bits=jnp.asarray(bits, jnp.float32),
        )
    result = evaluate(problem, allocation)
    return allocation, {
        "objective": result["objective"],
        "deadline_s": deadline,
        "feasible": feasible(problem, allocation, budget=False),
    }


def allocate_bits_search(problem: Problem) -> tuple[Allocation, dict]:
    """Exact power and bandwidth for every integer bit vector meeting the budget; the best wins.

    Exhaustive over ``(bits_max - bits_min + 1)^S`` vectors (small S only: tests and studies);
    the candidates are solved as one batch.
    """
    wts = problem.weights
    s = problem.num_devices
    choices = np.arange(wts.bits_min, wts.bits_max + 1, dtype=np.float32)
    candidates = np.asarray(list(itertools.product(choices, repeat=s)), np.float32)
    budget = jax.jit(jax.vmap(lambda b: quant_budget_used(problem, b)))
    ok = np.asarray(budget(candidates)) <= problem.eps_q
    if not ok.any():
        raise ValueError(
            f"allocation.eps_q={problem.eps_q}: no bits in [{wts.bits_min}, {wts.bits_max}] meet it"
        )
    # Fewer bits never cost more, so only vectors that cannot lose a bit are worth solving.
    minimal = ok.copy()
    for i in range(s):
        lower = candidates.copy()
        lower[:, i] -= 1
        can_lower = (lower[:, i] >= wts.bits_min) & (np.asarray(budget(lower)) <= problem.eps_q)
        minimal &= ~can_lower
    bits = jnp.asarray(candidates[minimal])
    batch = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(bits), *x.shape)), problem)
    allocations, diag = allocate(batch, bits)
    best = int(np.argmin(np.asarray(diag["objective"])))
    return jax.tree.map(lambda x: x[best], allocations), jax.tree.map(lambda x: x[best], diag)


def local_bit_search(problem: Problem, bits) -> tuple[Allocation, dict]:
    """Float64 local search over integer bits (the reference beyond exhaustive search): from
    ``bits`` (meeting the budget), the best of every single-level lowering and every (one down,
    one up) exchange that meets the budget, all solved exactly as one batch, as long as it
    improves the objective."""
    wts = problem.weights
    s = problem.num_devices
    bits = np.asarray(bits, np.float32)
    eye = np.eye(s, dtype=np.float32)
    budget = jax.jit(jax.vmap(lambda b: quant_budget_used(problem, b)))
    best = allocate(problem, jnp.asarray(bits))
    while True:
        moves = [bits - eye[i] for i in range(s)]
        moves += [bits - eye[i] + eye[j] for i, j in itertools.permutations(range(s), 2)]
        moves = np.clip(np.stack(moves), wts.bits_min, wts.bits_max)  # one batch shape
        ok = np.asarray(budget(moves)) <= problem.eps_q
        n = len(moves)
        batch = jax.tree.map(lambda x, n=n: jnp.broadcast_to(x, (n, *x.shape)), problem)
        allocations, diag = allocate(batch, jnp.asarray(moves))
        values = np.where(ok, np.asarray(diag["objective"]), np.inf)
        i = int(values.argmin())
        if values[i] >= float(best[1]["objective"]) * (1 - 1e-7):
            return best
        bits = moves[i]
        best = jax.tree.map(lambda x, i=i: x[i], (allocations, diag))
