"""Projected-gradient allocator in JAX: jit-compiled, vmap-able, differentiable where smooth.

The descent runs on the bandwidth split alone. For a split beta, the best deadline T and powers
follow exactly (``deadline.polish``): each device transmits for all the time T leaves it, at the
power that just moves its bits, and ``F(T, beta)`` is convex in T, so golden-section search finds
T.
The remaining function ``F(beta) = min_T F(T, beta)`` is convex (a partial minimum of a jointly
convex function, SPEC section 4) and its gradient follows from Danskin's theorem
(``reduced_objective``). The simplex constraint is met by construction, ``beta = B softmax(theta)``
(a mirror-descent style projection; Euclidean steps on (p, beta) stall a few percent above the
optimum), and Adam with a cosine-decayed step handles the kink where the slowest device sits at
full power.

Bits (when free) are relaxed, ``b = b_min + (b_max - b_min) sigmoid(theta_b)``, descended together
with the split under a quadratic penalty on the learning budget, rounded up (``delta(b)`` falls
with b, so rounding up keeps the budget; if the relaxed point still misses it, the smallest uniform
bits that meet it are used), the split is descended again for the integer bits, and the integer
bits are refined by exchange moves with exact re-solves (``allocation.refine``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from sflam_jax.allocation.deadline import Split, polish
from sflam_jax.allocation.problem import (
    Allocation,
    Problem,
    evaluate,
    feasible,
    quant_budget_used,
    smallest_bits,
)
from sflam_jax.allocation.refine import RefineOptions, improve


@dataclasses.dataclass(frozen=True)
class PGDOptions:
    """Descent settings.

    Attributes:
      steps: Adam steps per descent.
      learning_rate: initial Adam step on the softmax logits (cosine-decayed to 1e-3 of it).
      budget_penalty: weight of the squared relative budget violation while bits are relaxed.
      deadline_iters: golden-section iterations for the deadline inside each step.
      polish_iters: golden-section iterations of the final deadline.
      refine: the integer refinement of free bits (``RefineOptions(sweeps=0)``: none).
    """

    steps: int = 1500
    learning_rate: float = 0.05
    budget_penalty: float = 10.0
    deadline_iters: int = 40
    polish_iters: int = 80
    refine: RefineOptions = RefineOptions()


def reduced_objective(problem: Problem, bandwidth_hz, bits, iters: int = 40):
    """``F(beta) = min_T F(T, beta)``, convex in beta, with its gradient by Danskin's theorem.

    The deadline is solved exactly and held fixed for differentiation, except that it follows
    ``T_min(beta)`` when it sits there (there dF/dT != 0 and the bound moves with beta; elsewhere
    dF/dT = 0 and the extra term vanishes).
    """
    deadline = Split(problem, jax.lax.stop_gradient(bandwidth_hz), bits).best_deadline(iters)
    split = Split(problem, bandwidth_hz, bits)
    t_min = split.fastest_deadline()
    return split.objective(t_min + jax.lax.stop_gradient(deadline - t_min))


def _descend(problem: Problem, theta: dict, bits_fixed, options: PGDOptions) -> dict:
    """Adam on the bandwidth logits (and the relaxed bits when ``bits_fixed`` is None)."""

    def objective(theta):
        beta = problem.params.bandwidth_hz * jax.nn.softmax(theta["bandwidth"])
        if bits_fixed is not None:
            return reduced_objective(problem, beta, bits_fixed, options.deadline_iters)
        bits = relaxed_bits(problem, theta["bits"])
        excess = jax.nn.relu(quant_budget_used(problem, bits) / problem.eps_q - 1.0)
        value = reduced_objective(problem, beta, bits, options.deadline_iters)
        return value + options.budget_penalty * excess**2

    tx = optax.adam(optax.cosine_decay_schedule(options.learning_rate, options.steps, alpha=1e-3))

    def step(_, carry):
        theta, state = carry
        updates, state = tx.update(jax.grad(objective)(theta), state)
        return optax.apply_updates(theta, updates), state

    theta, _ = jax.lax.fori_loop(0, options.steps, step, (theta, tx.init(theta)))
    return theta


def relaxed_bits(problem: Problem, theta_bits: jax.Array) -> jax.Array:
    wts = problem.weights
    return wts.bits_min + (wts.bits_max - wts.bits_min) * jax.nn.sigmoid(theta_bits)


def allocate(
    problem: Problem, bits: jax.Array | None = None, options: PGDOptions = PGDOptions()
) -> tuple[Allocation, dict]:
    """PGD allocation of power, bandwidth and (when ``bits`` is None) cut-layer bits.

    Args:
      problem: one instance (``[S]`` arrays); ``jax.vmap`` over a leading axis solves many.
      bits: ``[S]`` fixed bits, or None to choose integer bits meeting the learning budget
        (relaxed, rounded up, then refined).
      options: descent settings.

    Returns:
      ``(allocation, diagnostics)`` with ``objective``, ``feasible``, ``deadline_s`` and
      ``relaxed_objective`` (the objective at the relaxed bits before rounding; NaN for fixed bits).
    """
    s = problem.num_devices
    theta = {"bandwidth": jnp.zeros((s,))}
    relaxed = jnp.nan
    free = bits is None
    if free:
        # Start the relaxed bits at the smallest uniform bits that meet the budget.
        wts = problem.weights
        start = (smallest_bits(problem) - wts.bits_min) / max(wts.bits_max - wts.bits_min, 1)
        start = jnp.clip(start, 0.05, 0.95)
        theta = _descend(problem, {**theta, "bits": jnp.log(start / (1 - start))}, None, options)
        soft = relaxed_bits(problem, theta["bits"])
        beta = problem.params.bandwidth_hz * jax.nn.softmax(theta["bandwidth"])
        relaxed = evaluate(problem, polish(problem, beta, soft, options.polish_iters)[0])[
            "objective"
        ]
        rounded = jnp.ceil(soft - 1e-4)
        ok = quant_budget_used(problem, rounded) <= problem.eps_q
        bits = jnp.where(ok, rounded, smallest_bits(problem))
        theta = {"bandwidth": theta["bandwidth"]}
    bits = jnp.asarray(bits, jnp.float32)
    theta = _descend(problem, theta, bits, options)
    beta = problem.params.bandwidth_hz * jax.nn.softmax(theta["bandwidth"])
    allocation, deadline = polish(problem, beta, bits, options.polish_iters)
    if free:
        allocation, _ = improve(problem, allocation, options.refine)
        deadline = evaluate(problem, allocation)["round_latency_s"]
    return allocation, {
        "objective": evaluate(problem, allocation)["objective"],
        "feasible": feasible(problem, allocation),
        "deadline_s": deadline,
        "relaxed_objective": relaxed,
    }
