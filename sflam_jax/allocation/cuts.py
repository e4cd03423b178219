"""Per-device cut layers and server compute shares: the ESFL problem (SPEC section 6.2).

Device k trains blocks ``[0, l_k)`` with its cut ``l_k`` from a candidate set; its server copy
trains the rest with a share ``f_k^S`` of the server (``sum_k f_k^S <= F_server``). At cut l, with
bandwidth ``beta_k``, power ``p_k`` and bits ``b_k``, its round takes

    T_k = tau_k 3 B F_c(l) / (phi f_k) + tau_k 3 B F_s(l) / f_k^S + comm_k(l)
    comm_k(l) = (tau_k B P(b_k, Gamma(l)) + 32 |w_c(l)|) / r_up
                + (tau_k B P(g, Gamma(l)) + 32 |w_c(l)|) / r_dn

and its energy ``E_k = tau_k kappa f_k^2 3 B F_c(l) / phi + p_k (tau_k B P(b_k, Gamma(l)) +
32 |w_c(l)|) / r_up`` (section 3 with the cut's FLOPs and sizes). Cut l is allowed on device k when
its training memory ``M(l)`` fits the device's ``M_k^max``.

ESFL's problem: at equal bandwidth and full power, choose the cuts and the shares to minimise
``T_round = max_k T_k``. For a trial deadline T each device needs, over its allowed cuts, the least
share ``3 B tau_k F_s(l) / (T - T_k^dev(l))`` (``T_k^dev``: everything but the server's part), and
T is feasible iff these sum to at most ``F_server``; the sum falls with T, so bisection on T gives
the global optimum (``exact``). ``alternate`` is the paper's alternating optimisation: shares for
fixed cuts (the same bisection, cuts held), then each device's best cut for its share, until the
cuts stop moving.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from sflam_jax.allocation.search import bisect
from sflam_jax.wireless.channel import Devices, SystemParams, rate_bps
from sflam_jax.wireless.costs import Workload, round_loads


@flax.struct.dataclass
class CutTable:
    """What each candidate cut costs (``[L]`` arrays, one entry per candidate, in cut order).

    Attributes:
      cut: the cut layer ``l`` (blocks on the device).
      client_flops: ``F_c(l)``, device forward FLOPs per sample.
      server_flops: ``F_s(l)``, server forward FLOPs per sample.
      values: ``Gamma(l)``, values of one sample's smashed data.
      client_params: ``|w_c(l)|``.
      memory_bytes: ``M(l)``, the device's training memory at this cut.
    """

    cut: jax.Array
    client_flops: jax.Array
    server_flops: jax.Array
    values: jax.Array
    client_params: jax.Array
    memory_bytes: jax.Array

    @property
    def size(self) -> int:
        return self.cut.shape[-1]


@dataclasses.dataclass(frozen=True)
class CutWorkload(Workload):
    """``Workload`` at the config's cut ``cut_layer`` (for the comparison protocols and the
    references) plus every candidate cut's costs, from XLA's cost and memory analyses (tuples in
    cut order, see ``CutTable``)."""

    cut_layer: int = 0
    cuts: tuple[int, ...] = ()
    cut_client_flops: tuple[float, ...] = ()
    cut_server_flops: tuple[float, ...] = ()
    cut_values: tuple[int, ...] = ()
    cut_client_params: tuple[int, ...] = ()
    cut_memory_bytes: tuple[float, ...] = ()

    def table(self) -> CutTable:
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return CutTable(
            cut=jnp.asarray(self.cuts, jnp.int32),
            client_flops=f32(self.cut_client_flops),
            server_flops=f32(self.cut_server_flops),
            values=f32(self.cut_values),
            client_params=f32(self.cut_client_params),
            memory_bytes=f32(self.cut_memory_bytes),
        )


@flax.struct.dataclass
class CutProblem:
    """One round's ESFL instance; device arrays are ``[S]``.

    Attributes:
      devices: gains and clocks of the S sampled devices.
      memory_bytes: ``M_k^max``, each device's training memory.
      steps: local steps tau_k.
      table: the candidate cuts.
      batch_size: B (static).
      down_bits: downlink gradient bits (static).
      params: system constants (static).
    """

    devices: Devices
    memory_bytes: jax.Array
    steps: jax.Array
    table: CutTable
    batch_size: int = flax.struct.field(pytree_node=False)
    down_bits: int = flax.struct.field(pytree_node=False)
    params: SystemParams = flax.struct.field(pytree_node=False)

    @property
    def num_devices(self) -> int:
        return self.steps.shape[-1]

    def allowed(self) -> jax.Array:
        """``[S, L]``: the cuts whose training memory fits each device."""
        return self.table.memory_bytes[None, :] <= self.memory_bytes[:, None]


@flax.struct.dataclass
class CutAllocation:
    """Per-device decisions (``[S]`` each): ``cut`` (an index into the table's candidates, not
    the layer), ``server_flops`` (the share ``f_k^S`` in FLOP/s), ``power_w``, ``bandwidth_hz``,
    ``bits``."""

    cut: jax.Array
    server_flops: jax.Array
    power_w: jax.Array
    bandwidth_hz: jax.Array
    bits: jax.Array


def per_cut_times(problem: CutProblem, power_w, bandwidth_hz, bits, dtype=jnp.float32) -> dict:
    """Every device's costs at every candidate cut, ``[S, L]`` arrays of ``dtype``.

    Returns ``device_s`` (device compute and communication: all of ``T_k`` but the server's part),
    ``server_work`` (the server's FLOPs for the device's round, ``tau_k 3 B F_s(l)``), ``compute_s``
    (device compute alone), ``energy_j``, ``compute_energy_j`` and ``comm_energy_j``.
    """
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    p, t = problem.params, problem.table
    dev = problem.devices
    column = lambda x: cast(x)[:, None]  # noqa: E731
    row = lambda x: cast(x)[None, :]  # noqa: E731
    # SFL-V1's round formula (``wireless.costs.round_loads``), devices down, cuts across.
    loads = round_loads(
        Devices(column(dev.distance_m), column(dev.gain), column(dev.cpu_hz)),
        column(problem.steps),
        column(bits),
        Workload(
            client_flops=row(t.client_flops),
            server_flops=row(t.server_flops),
            values_per_sample=row(t.values),
            client_params=row(t.client_params),
            batch_size=float(problem.batch_size),
        ),
        p,
        problem.down_bits,
        dtype=dtype,
    )
    n0 = p.noise_w_per_hz
    r_up = rate_bps(cast(bandwidth_hz), cast(power_w), cast(dev.gain), n0)[:, None]
    r_dn = rate_bps(cast(bandwidth_hz), p.server_power_w, cast(dev.gain), n0)[:, None]
    compute_s = loads["device_s"]
    comm_s = loads["up_bits"] / r_up + loads["down_bits"] / r_dn
    compute_j = loads["compute_j"]
    comm_j = cast(power_w)[:, None] * loads["up_bits"] / r_up
    return {
        "device_s": compute_s + comm_s,
        "server_work": loads["server_flops"],
        "compute_s": compute_s,
        "comm_s": comm_s,
        "energy_j": compute_j + comm_j,
        "compute_energy_j": compute_j,
        "comm_energy_j": comm_j,
    }


def _at(matrix, cut):
    return jnp.take_along_axis(matrix, cut[:, None], axis=1)[:, 0]


def round_costs(problem: CutProblem, allocation: CutAllocation) -> dict[str, jax.Array]:
    """Latency and energy of an allocation, keys as ``wireless.costs.sflam_round_costs`` (the
    server's part of a device's round counts as compute)."""
    per = per_cut_times(problem, allocation.power_w, allocation.bandwidth_hz, allocation.bits)
    cut = allocation.cut
    server_s = _at(per["server_work"], cut) / allocation.server_flops
    compute_s = _at(per["compute_s"], cut) + server_s
    comm_s = _at(per["comm_s"], cut)
    latency = compute_s + comm_s
    energy = _at(per["energy_j"], cut)
    return {
        "latency_s": latency,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "energy_j": energy,
        "compute_energy_j": _at(per["compute_energy_j"], cut),
        "comm_energy_j": _at(per["comm_energy_j"], cut),
        "round_latency_s": jnp.max(latency),
        "round_energy_j": jnp.sum(energy),
    }


def _equal_links(problem: CutProblem, bits):
    s = problem.num_devices
    p = problem.params
    shape = problem.steps.shape
    return (
        jnp.full(shape, p.p_max_w),
        jnp.full(shape, p.bandwidth_hz / s),
        jnp.broadcast_to(jnp.asarray(bits, jnp.float32), shape),
    )


def least_shares(device_s, work, allowed, deadline):
    """Least server share per device and cut to finish by ``deadline`` (inf: cannot)."""
    slack = deadline - device_s
    need = work / jnp.where(slack > 0, slack, 1.0)
    return jnp.where(allowed & (slack > 0), need, jnp.inf)


def _deadline_search(device_s, work, allowed, capacity, iters: int):
    """The least T at which the devices' least shares (each over its ``allowed`` cuts) sum to at
    most ``capacity``; bisection on T (the sum falls with T)."""
    lo = jnp.max(jnp.min(jnp.where(allowed, device_s, jnp.inf), axis=1))
    s = device_s.shape[0]
    # At the deadline where every device meets it on an equal share, the shares fit.
    equal = jnp.where(allowed, device_s + work * s / capacity, jnp.inf)
    hi = jnp.max(jnp.min(equal, axis=1))

    def fits(deadline):
        need = jnp.min(least_shares(device_s, work, allowed, deadline), axis=1)
        return jnp.sum(need) <= capacity

    return bisect(fits, lo, hi, iters, log=False)


def _settle(device_s, work, allowed, capacity, deadline):
    """Cuts and shares meeting ``deadline``: each device's cut of least need, the shares scaled
    up to use the whole server (every device then finishes by the deadline)."""
    need = least_shares(device_s, work, allowed, deadline)
    cut = jnp.argmin(need, axis=1)
    least = _at(need, cut)
    shares = least * capacity / jnp.sum(least)
    return cut, shares


def _infeasible(problem: CutProblem) -> tuple[jax.Array, jax.Array]:
    """Whether some device has no allowed cut, and the first such device (-1: none)."""
    none = ~jnp.any(problem.allowed(), axis=1)
    return jnp.any(none), jnp.where(jnp.any(none), jnp.argmax(none), -1)


def allowed_or_least(problem: CutProblem) -> jax.Array:
    """``[S, L]`` allowed cuts, with a device that fits none given its least-memory cut (the
    solution is then reported infeasible, naming that device)."""
    allowed = problem.allowed()
    least = problem.table.memory_bytes == jnp.min(problem.table.memory_bytes)
    return jnp.where(jnp.any(allowed, axis=1, keepdims=True), allowed, least[None, :])


def _result(problem, cut, shares, power, band, bits):
    allocation = CutAllocation(cut, shares, power, band, bits)
    costs = round_costs(problem, allocation)
    bad, device = _infeasible(problem)
    return allocation, {
        "round_latency_s": costs["round_latency_s"],
        "feasible": ~bad,
        "infeasible_device": device,
    }


def exact(problem: CutProblem, bits, iters: int = 100, dtype=jnp.float32):
    """ESFL's global optimum: cuts and server shares minimising ``T_round`` at equal bandwidth,
    full power and the given bits, by bisection on the deadline (module docstring).

    Args:
      problem: the instance (``[S]`` devices).
      bits: ``[S]`` (or scalar) cut-layer bits, fixed.
      iters: bisection steps (100 reach float64 resolution).
      dtype: arithmetic of the search (float64 for the test oracle, under ``jax.enable_x64``).

    Returns:
      ``(CutAllocation, diagnostics)``: ``round_latency_s`` (float32 costs of the allocation),
      ``deadline_s`` (the search's T, in ``dtype``), ``feasible`` and ``infeasible_device`` (the
      first device whose memory fits no candidate cut, -1 if none).
    """
    power, band, bits = _equal_links(problem, bits)
    per = per_cut_times(problem, power, band, bits, dtype)
    allowed = allowed_or_least(problem)
    capacity = jnp.asarray(problem.params.server_flops, dtype)
    deadline = _deadline_search(per["device_s"], per["server_work"], allowed, capacity, iters)
    cut, shares = _settle(per["device_s"], per["server_work"], allowed, capacity, deadline)
    allocation, diag = _result(
        problem, cut, shares.astype(jnp.float32), power, band, bits.astype(jnp.float32)
    )
    return allocation, {**diag, "deadline_s": deadline}


def alternate(problem: CutProblem, bits, start=None, rounds: int = 10, iters: int = 60):
    """ESFL's alternating optimisation: server shares for fixed cuts (equal finish times, by
    bisection), then each device's fastest allowed cut for its share, ``rounds`` times or until
    the cuts stop moving; the best point seen is returned, so never worse than the start.

    Args:
      problem: the instance.
      bits: ``[S]`` (or scalar) cut-layer bits, fixed.
      start: ``[S]`` starting cut indices (default: each device's deepest allowed cut, the
        least server work).
      rounds: alternation rounds.
      iters: bisection steps of each share update.

    Returns:
      ``(CutAllocation, diagnostics)``: ``round_latency_s``, ``history`` (``[rounds + 1]``
      ``T_round`` after the start's shares and each round), ``feasible``, ``infeasible_device``.
    """
    power, band, bits = _equal_links(problem, bits)
    per = per_cut_times(problem, power, band, bits)
    allowed = allowed_or_least(problem)
    size = problem.table.size
    if start is None:
        start = size - 1 - jnp.argmax(allowed[:, ::-1], axis=1)
    capacity = jnp.float32(problem.params.server_flops)
    device_s, work = per["device_s"], per["server_work"]

    def shares_for(cut):
        held = jax.nn.one_hot(cut, size, dtype=bool)
        deadline = _deadline_search(device_s, work, held, capacity, iters)
        return _settle(device_s, work, held, capacity, deadline)[1]

    def latency(cut, shares):
        return jnp.max(_at(device_s, cut) + _at(work, cut) / shares)

    def step(carry, _):
        cut, shares, best = carry
        times = device_s + work / shares[:, None]
        moved = jnp.argmin(jnp.where(allowed, times, jnp.inf), axis=1)
        new_shares = shares_for(moved)
        t = latency(moved, new_shares)
        better = t < best[2]
        best = jax.tree.map(lambda n, o: jnp.where(better, n, o), (moved, new_shares, t), best)
        return (moved, new_shares, best), t

    shares0 = shares_for(start)
    t0 = latency(start, shares0)
    (_, _, best), history = jax.lax.scan(
        step, (start, shares0, (start, shares0, t0)), None, length=rounds
    )
    cut, shares, _ = best
    allocation, diag = _result(problem, cut, shares, power, band, bits)
    return allocation, {**diag, "history": jnp.concatenate([t0[None], history])}
