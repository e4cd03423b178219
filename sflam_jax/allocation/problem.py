"""The per-round resource allocation problem of SPEC section 4.

    minimise   w_T T_round / T_ref + w_E E_round / E_ref
    subject to 0 <= p_k <= P_max,  beta_k >= 0,  sum_k beta_k <= B,
               b_k in {b_min, ..., b_max},  sum_k rho_k delta(b_k) <= eps_Q

For fixed bits, device k's round time and energy are

    T_k = A_k + D_k / r_up(beta_k, p_k) + H_k / r_dn(beta_k)
    E_k = C_k + p_k D_k / r_up(beta_k, p_k)

with A_k, C_k its compute time and energy, D_k = tau_k B P(b_k) + 32 |w_c| its uplink bits and
H_k = tau_k B P(g_bits) + 32 |w_c| its downlink bits (SPEC section 3). ``Problem`` holds these
per-device quantities so that every solver sees the same numbers as ``wireless.costs``.

A protocol whose round moves other traffic (SFPrompt: four cut crossings on pruned samples) hands
the problem its own ``loads`` function; its round keeps the same form, so every solver runs on it
unchanged, and the learning budget counts the values it quantizes (``Workload.budget_values``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from sflam_jax import quant
from sflam_jax.wireless.channel import Devices, SystemParams, rate_bps
from sflam_jax.wireless.costs import Workload, loads_costs, round_loads, sflam_round_costs


@dataclasses.dataclass(frozen=True)
class Weights:
    """Objective weights, bit range and learning budget (config ``allocation``).

    Attributes:
      w_t: weight of normalised latency (> 0).
      w_e: weight of normalised energy; ``w_t + w_e = 1``.
      bits_min, bits_max: range of cut-layer bits.
      eps_q: learning-quality budget on ``sum_k rho_k delta(b_k)``.
      value_range: assumed ``max - min`` of a sample's smashed data in ``delta(b)``.
      down_bits: downlink gradient bits (not optimised).
    """

    w_t: float = 0.5
    w_e: float = 0.5
    bits_min: int = 2
    bits_max: int = 16
    eps_q: float = 0.5
    value_range: float = 10.0
    down_bits: int = 32

    def __post_init__(self):
        if isinstance(self.w_t, jax.core.Tracer):
            return  # a vectorized sweep: every point's value was checked before tracing
        if not self.w_t > 0:
            raise ValueError(
                f"allocation.w_t={self.w_t} must be > 0 (with w_t = 0 the deadline is unbounded)"
            )
        if self.w_e < 0:
            raise ValueError(f"allocation.w_e={self.w_e} must be >= 0")
        if abs(self.w_t + self.w_e - 1.0) > 1e-9:
            raise ValueError(
                f"allocation.w_t + allocation.w_e = {self.w_t + self.w_e} must equal 1"
            )
        if not 1 <= self.bits_min <= self.bits_max <= 31:
            raise ValueError(
                f"allocation.bits_min={self.bits_min}, allocation.bits_max={self.bits_max}: "
                "need 1 <= bits_min <= bits_max <= 31"
            )
        if not self.eps_q > 0:
            raise ValueError(f"allocation.eps_q={self.eps_q} must be > 0")

    @classmethod
    def from_config(cls, allocation, down_bits: int) -> Weights:
        """The weights of a ``config.allocation`` block with the protocol's downlink bits.

        Raises:
          ValueError: a bad field, named in the message.
        """
        a = allocation
        return cls(
            w_t=float(a.w_t),
            w_e=float(a.w_e),
            bits_min=a.bits_min,
            bits_max=a.bits_max,
            eps_q=float(a.eps_q),
            value_range=float(a.value_range),
            down_bits=down_bits,
        )


@dataclasses.dataclass(frozen=True)
class BitsSpec:
    """The static part of ``Weights``: bit range, assumed value range, downlink bits."""

    bits_min: int
    bits_max: int
    value_range: float
    down_bits: int


@flax.struct.dataclass
class Problem:
    """One round's allocation instance; arrays are ``[S]`` (add leading axes with ``vmap``).

    Attributes:
      devices: gains and clocks of the S sampled devices.
      steps: local steps tau_k.
      rho: data weights ``n_k / sum_j n_j``.
      workload: FLOPs and sizes of the split model (static).
      params: system constants (static).
      weights: bit range, value range and downlink bits (static); the objective weights and the
        budget are array fields, so instances that differ only in them batch together.
      t_ref, e_ref: latency and energy at full power, equal bandwidth and 32 bits.
      w_t, w_e: objective weights; eps_q: learning budget.
      load_data: what a protocol's ``loads`` reads besides the devices (SFPrompt: the clients'
        ``[S]`` sample counts; per-device cuts: each device's costs at its cut); None with
        SFL-V1's loads.
      loads: ``(devices, steps, up_bits, workload, params, down_bits, load_data) -> {compute_s,
        compute_j, up_bits, down_bits}``, the protocol's per-device ``A, C, D, H`` (static);
        None: SFL-V1's (``wireless.costs.round_loads``).
    """

    devices: Devices
    steps: jax.Array
    rho: jax.Array
    t_ref: jax.Array
    e_ref: jax.Array
    w_t: jax.Array
    w_e: jax.Array
    eps_q: jax.Array
    workload: Workload = flax.struct.field(pytree_node=False)
    params: SystemParams = flax.struct.field(pytree_node=False)
    weights: BitsSpec = flax.struct.field(pytree_node=False)
    load_data: Any = None
    loads: Callable[..., dict] | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def num_devices(self) -> int:
        return self.steps.shape[-1]


@flax.struct.dataclass
class Allocation:
    """Per-device decisions: ``power_w``, ``bandwidth_hz``, ``bits`` (``[S]`` each)."""

    power_w: jax.Array
    bandwidth_hz: jax.Array
    bits: jax.Array


def make_problem(
    devices: Devices,
    steps: jax.Array,
    rho: jax.Array,
    workload: Workload,
    params: SystemParams,
    weights: Weights,
    loads: Callable[..., dict] | None = None,
    load_data: Any = None,
) -> Problem:
    """Builds an instance; ``T_ref``, ``E_ref`` are at equal bandwidth, full power and 32 bits.

    ``loads`` (with its ``load_data``) replaces SFL-V1's per-device loads; see ``Problem``.
    """
    s = steps.shape[-1]
    if loads is not None and load_data is None:
        raise ValueError("make_problem: a protocol's loads need their load_data")
    problem = Problem(
        devices=devices,
        steps=jnp.asarray(steps, jnp.float32),
        rho=jnp.asarray(rho, jnp.float32),
        t_ref=jnp.float32(1.0),  # set below, from the costs of this problem
        e_ref=jnp.float32(1.0),
        w_t=jnp.float32(weights.w_t),
        w_e=jnp.float32(weights.w_e),
        eps_q=jnp.float32(weights.eps_q),
        workload=workload,
        params=params,
        weights=BitsSpec(
            weights.bits_min, weights.bits_max, weights.value_range, weights.down_bits
        ),
        load_data=None if loads is None else load_data,
        loads=loads,
    )
    ref = _costs(
        problem,
        jnp.full((s,), params.p_max_w),
        jnp.full((s,), params.bandwidth_hz / s),
        jnp.full((s,), float(quant.FLOAT_BITS)),
    )
    return problem.replace(t_ref=ref["round_latency_s"], e_ref=ref["round_energy_j"])


def link_loads(problem: Problem, bits: jax.Array) -> dict[str, jax.Array]:
    """The fixed-bits terms ``A_k, C_k, D_k, H_k`` of the module docstring (``[S]`` each)."""
    args = (problem.devices, problem.steps, bits, problem.workload, problem.params)
    if problem.loads is None:
        return round_loads(*args, problem.weights.down_bits)
    return problem.loads(*args, problem.weights.down_bits, problem.load_data)


def _costs(problem: Problem, power_w, bandwidth_hz, bits) -> dict[str, jax.Array]:
    if problem.loads is None:
        # SFL-V1's own expression (the same numbers up to rounding; kept so runs stay bit-stable)
        return sflam_round_costs(
            problem.devices,
            problem.steps,
            power_w,
            bandwidth_hz,
            bits,
            problem.workload,
            problem.params,
            problem.weights.down_bits,
        )
    return loads_costs(
        link_loads(problem, bits), problem.devices, power_w, bandwidth_hz, problem.params
    )


def evaluate(problem: Problem, allocation: Allocation) -> dict[str, jax.Array]:
    """Round costs of an allocation and its objective ``w_T T/T_ref + w_E E/E_ref``."""
    costs = _costs(problem, allocation.power_w, allocation.bandwidth_hz, allocation.bits)
    objective = (
        problem.w_t * costs["round_latency_s"] / problem.t_ref
        + problem.w_e * costs["round_energy_j"] / problem.e_ref
    )
    budget = quant_budget_used(problem, allocation.bits)
    return {**costs, "objective": objective, "quant_error": budget}


def quant_budget_used(problem: Problem, bits: jax.Array) -> jax.Array:
    """``sum_k rho_k delta(b_k)`` (SPEC sections 2 and 4)."""
    wts = problem.weights
    delta = quant.error_proxy(bits, problem.workload.budget_values, wts.value_range)
    return jnp.sum(problem.rho * delta, axis=-1)


def smallest_bits(problem: Problem) -> jax.Array:
    """Smallest uniform bit width meeting the learning budget (``bits_max`` if none does).

    ``delta`` falls with ``b``, so equal bits ``b`` meet the budget iff ``delta(b) <= eps_Q``
    (the ``rho_k`` sum to 1).
    """
    wts = problem.weights
    candidates = jnp.arange(wts.bits_min, wts.bits_max + 1, dtype=jnp.float32)
    delta = quant.error_proxy(candidates, problem.workload.budget_values, wts.value_range)
    ok = delta <= problem.eps_q
    b = jnp.where(jnp.any(ok), candidates[jnp.argmax(ok)], float(wts.bits_max))
    return jnp.full(problem.steps.shape, b)


def feasible(
    problem: Problem, allocation: Allocation, rtol: float = 1e-6, budget: bool = True
) -> jax.Array:
    """Whether an allocation satisfies every constraint (the bits budget too when ``budget``)."""
    p = problem.params
    wts = problem.weights
    power, bw, bits = allocation.power_w, allocation.bandwidth_hz, allocation.bits
    ok_power = jnp.all((power >= 0) & (power <= p.p_max_w * (1 + rtol)), axis=-1)
    ok_bw = jnp.all(bw >= 0, axis=-1) & (jnp.sum(bw, axis=-1) <= p.bandwidth_hz * (1 + rtol))
    ok_bits = jnp.all((bits >= wts.bits_min) & (bits <= wts.bits_max), axis=-1)
    ok_budget = quant_budget_used(problem, allocation.bits) <= problem.eps_q * (1 + rtol)
    return ok_power & ok_bw & (ok_bits & ok_budget if budget else True)


LN2 = 0.6931471805599453


class Links:
    """Fixed-bits closed forms of every device's link, as functions of its bandwidth share.

    Holds ``A_k, C_k, D_k, H_k`` (module docstring) and the gains as ``[S]`` arrays of ``dtype``
    (float64 for the exact solver); the methods take bandwidth ``beta`` (and power or uplink
    time) of the same shape.
    """

    def __init__(self, problem: Problem, bits, dtype=jnp.float32):
        loads = link_loads(problem, bits)
        cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        self.a, self.c = cast(loads["compute_s"]), cast(loads["compute_j"])
        self.d, self.h = cast(loads["up_bits"]), cast(loads["down_bits"])
        self.g = cast(problem.devices.gain)
        p = problem.params
        self.n0, self.p_max, self.p_srv, self.bw = (
            p.noise_w_per_hz,
            p.p_max_w,
            p.server_power_w,
            p.bandwidth_hz,
        )

    def rate(self, beta, power):
        return rate_bps(beta, power, self.g, self.n0)

    def down_time(self, beta):
        return self.h / self.rate(beta, self.p_srv)

    def finish(self, beta, power):
        """Round time ``A + D / r_up + H / r_dn`` at this bandwidth and uplink power."""
        return self.a + self.d / self.rate(beta, power) + self.down_time(beta)

    def transmit_energy(self, uplink_s, beta):
        """Least energy to send D bits in time t: ``(N0/G) v (2^(D/v) - 1)``, ``v = t beta``."""
        v = uplink_s * beta
        return self.n0 / self.g * v * jnp.expm1(LN2 * self.d / v)

    def transmit_power(self, uplink_s, beta):
        """The power that sends ``D`` bits in exactly ``uplink_s``."""
        return beta * self.n0 / self.g * jnp.expm1(LN2 * self.d / (uplink_s * beta))
