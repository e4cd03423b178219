"""Latency and device energy of an SFLAM round (SPEC section 3), per device and in total."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sflam_jax.quant import FLOAT_BITS, payload_bits
from sflam_jax.wireless.channel import Devices, SystemParams, rate_bps


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one local step of the split model costs, independent of the channel.

    Attributes:
      client_flops: F_c, forward FLOPs of the client segment per sample.
      server_flops: F_s, forward FLOPs of the server segment per sample.
      values_per_sample: Gamma, values of one sample's smashed data.
      client_params: |w_c|, parameters of the client segment (aggregation traffic).
      batch_size: B.
      server_params: |w_s|, parameters of the server segment (FL moves |w_c| + |w_s|).
      client_shared: parameters of the client segment a device sends and receives at
        aggregation when that is not all of them (LoRA: its adapters; 0 for a frozen device
        segment); None: ``client_params``.
      client_trains: whether the device's segment trains at all; a frozen one (LoRA with the
        device's segment frozen) runs its forward only and receives no gradient.
    """

    client_flops: float
    server_flops: float
    values_per_sample: int
    client_params: int
    batch_size: int
    server_params: int = 0
    client_shared: int | None = None
    client_trains: bool = True

    @property
    def aggregated_params(self) -> int:
        """Parameters a device sends (and receives) at aggregation."""
        return self.client_params if self.client_shared is None else self.client_shared

    @property
    def budget_values(self) -> int:
        """Values per sample the device quantizes, the Gamma of the learning budget
        ``sum_k rho_k delta(b_k)`` (SPEC section 4): the smashed data at the cut."""
        return self.values_per_sample


def step_terms(
    devices: Devices,
    up_bits: jax.Array,
    workload: Workload,
    params: SystemParams,
    down_bits: jax.Array | int = FLOAT_BITS,
    server_copies: int | None = None,
) -> dict[str, jax.Array]:
    """The per-step and per-round terms of SPEC section 3, the one place they are written.

    Args:
      devices: the S devices (``[..., S]`` arrays; or ``[S, 1]`` against a workload of ``[1, L]``
        per-cut FLOPs and sizes, where ``t_srv`` then needs ``server_copies``).
      up_bits: ``[S]`` cut-layer bits b_k (32 = float32).
      workload: FLOPs and sizes of the split model.
      params: the system constants.
      down_bits: downlink gradient bits.
      server_copies: server segments sharing F_server at once (default S).

    Returns:
      ``t_cf`` (device forward, s), ``t_cb`` (device backward, s), ``t_srv`` (server forward and
      backward, s), ``server_step_flops`` (``3 B F_s``), ``cycles_fwd`` (device cycles of a
      forward, ``B F_c / phi``), ``up_step_bits`` (``B P(b)``), ``down_step_bits``
      (``B P(g_bits)``) per local step, and ``agg_bits`` (``32 |w_c|``, each way once per round).
    """
    s = devices.gain.shape[-1] if server_copies is None else server_copies
    b = workload.batch_size
    cycles_fwd = b * workload.client_flops / params.flops_per_cycle
    t_cf = cycles_fwd / devices.cpu_hz
    # A frozen device segment: no backward, no gradient sent down.
    trains = float(workload.client_trains)
    return {
        "t_cf": t_cf,
        "t_cb": 2.0 * trains * t_cf,
        "device_passes": 1.0 + 2.0 * trains,
        "t_srv": 3.0 * b * workload.server_flops * s / params.server_flops,
        "server_step_flops": 3.0 * b * workload.server_flops,
        "cycles_fwd": cycles_fwd,
        "up_step_bits": b * payload_bits(up_bits, workload.values_per_sample),
        "down_step_bits": trains * b * payload_bits(down_bits, workload.values_per_sample),
        # float: ViT-B sizes overflow int32
        "agg_bits": float(FLOAT_BITS) * workload.aggregated_params,
    }


def compute_energy_j(steps, terms: dict, devices: Devices, params: SystemParams) -> jax.Array:
    """Device compute energy of ``steps`` local steps, ``tau_k kappa f_k^2 3 B F_c / phi`` (a
    forward only, ``1 B F_c``, for a frozen device segment)."""
    return steps * params.kappa * devices.cpu_hz**2 * terms["device_passes"] * terms["cycles_fwd"]


def round_loads(
    devices: Devices,
    steps: jax.Array,
    up_bits: jax.Array,
    workload: Workload,
    params: SystemParams,
    down_bits: jax.Array | int = FLOAT_BITS,
    server_copies: int | None = None,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """An SFL-V1 round's channel-independent loads per device, the one round formula that the
    cost reports (``loads_costs``), the allocation problem and ESFL's per-cut table
    (``allocation.cuts``) share: ``compute_s`` ``A_k = tau_k (t_cf + t_cb + t_srv)``,
    ``compute_j`` ``C_k = tau_k E_cmp``, ``up_bits`` ``D_k = tau_k B P(b_k) + 32 |w_c|`` and
    ``down_bits`` ``H_k = tau_k B P(g_bits) + 32 |w_c|``; the round takes ``T_k = A_k + D_k / r_up +
    H_k / r_dn`` and ``E_k = C_k + p_k D_k / r_up``. Also ``device_s`` (``tau_k (t_cf + t_cb)``,
    the device's part of ``A_k``) and ``server_flops`` (``tau_k 3 B F_s``, the server's work for
    the device, for a protocol that chooses the server's shares). ``steps`` are cast to
    ``dtype``."""
    t = step_terms(devices, up_bits, workload, params, down_bits, server_copies)
    steps = jnp.asarray(steps, dtype)
    return {
        "compute_s": steps * (t["t_cf"] + t["t_cb"] + t["t_srv"]),
        "compute_j": compute_energy_j(steps, t, devices, params),
        "up_bits": steps * t["up_step_bits"] + t["agg_bits"],
        "down_bits": steps * t["down_step_bits"] + t["agg_bits"],
        "device_s": steps * (t["t_cf"] + t["t_cb"]),
        "server_flops": steps * t["server_step_flops"],
    }


def sflam_round_costs(
    devices: Devices,
    steps: jax.Array,
    power_w: jax.Array,
    bandwidth_hz: jax.Array,
    up_bits: jax.Array,
    workload: Workload,
    params: SystemParams,
    down_bits: jax.Array | int = FLOAT_BITS,
    server_copies: int | None = None,
) -> dict[str, jax.Array]:
    """Per-device and per-round latency and energy of one SFLAM (SFL-V1) round, SPEC section 3.

    Per local step: ``t_cf = B F_c / (phi f)``, ``t_cb = 2 t_cf``, ``t_up = B P(b) / r_up``,
    ``t_srv = 3 B F_s S / F_server``, ``t_dn = B P(g_bits) / r_dn``; per round
    ``T_k = tau_k (t_cf + t_up + t_srv + t_dn + t_cb) + t_agg_up + t_agg_dn`` with
    ``32 |w_c|`` bits each way for aggregation, and
    ``E_k = tau_k (kappa f^2 3 B F_c / phi + p t_up) + p t_agg_up``: ``loads_costs`` of
    ``round_loads`` (terms from ``step_terms``).

    Args:
      devices: the S devices (``[S]`` arrays).
      steps: ``[S]`` local steps tau_k.
      power_w: ``[S]`` uplink power p_k.
      bandwidth_hz: ``[S]`` bandwidth share beta_k (the downlink uses the same share).
      up_bits: ``[S]`` cut-layer bits b_k (32 = float32).
      workload: FLOPs and sizes of the split model.
      params: the system constants.
      down_bits: downlink gradient bits.
      server_copies: server segments sharing F_server at once (default S; SL uses 1).

    Returns:
      ``latency_s``, ``compute_s``, ``comm_s``, ``energy_j``, ``compute_energy_j``,
      ``comm_energy_j`` (each ``[S]``), ``round_latency_s`` (max over devices) and
      ``round_energy_j`` (sum over devices).
    """
    loads = round_loads(devices, steps, up_bits, workload, params, down_bits, server_copies)
    return loads_costs(loads, devices, power_w, bandwidth_hz, params)


def loads_costs(
    loads: dict, devices: Devices, power_w, bandwidth_hz, params: SystemParams
) -> dict[str, jax.Array]:
    """Latency and energy of a round given as per-device loads (``round_loads``' keys): ``T_k =
    A_k + D_k / r_up + H_k / r_dn`` and ``E_k = C_k + p_k D_k / r_up``, keys as
    ``sflam_round_costs``. The allocation problem's form for a protocol with its own traffic."""
    n0 = params.noise_w_per_hz
    r_up = rate_bps(bandwidth_hz, power_w, devices.gain, n0)
    r_dn = rate_bps(bandwidth_hz, params.server_power_w, devices.gain, n0)
    return _totals(
        loads["compute_s"],
        loads["up_bits"] / r_up + loads["down_bits"] / r_dn,
        loads["compute_j"],
        power_w * loads["up_bits"] / r_up,
    )


def _totals(compute_s, comm_s, compute_energy, comm_energy, serial=False):
    """Per-device sums and the round's totals (max latency, or the sum when devices serialise)."""
    latency = compute_s + comm_s
    energy = compute_energy + comm_energy
    return {
        "latency_s": latency,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "energy_j": energy,
        "compute_energy_j": compute_energy,
        "comm_energy_j": comm_energy,
        "round_latency_s": jnp.sum(latency, -1) if serial else jnp.max(latency, -1),
        "round_energy_j": jnp.sum(energy, axis=-1),
    }


def grouped_totals(per_device: dict, slots: jax.Array, workload: Workload) -> dict:
    """Round totals when the devices train in groups, one after another inside a group and the
    groups side by side (GSFL, SPEC section 6.1): a group takes the sum of its devices'
    latencies, the round the slowest group's.

    Args:
      per_device: ``sflam_round_costs`` of the S devices at the groups' resources.
      slots: ``[P, M]`` each group's devices (positions in ``per_device``; -1: none).
      workload: the split model's sizes (the hand-over moves ``32 |w_c|`` bits each way).

    Returns:
      The per-device arrays of ``per_device``, ``round_latency_s``, ``round_energy_j`` and
      ``extra``: ``group_latency_s`` ``[M]``, the slowest group's ``round_compute_s`` and
      ``round_comm_s``, the round's ``round_compute_energy_j`` and ``round_comm_energy_j``, and
      ``handover_bits`` (client segments passed between consecutive devices of a group, up and
      down).
    """
    member = slots >= 0
    at = jnp.maximum(slots, 0)

    def per_group(x):
        return jnp.sum(jnp.where(member, x[at], 0.0), axis=0)

    group_latency = per_group(per_device["latency_s"])
    slowest = jnp.argmax(group_latency)
    handovers = jnp.sum(jnp.maximum(jnp.sum(member, axis=0) - 1, 0))
    out = dict(per_device)
    out["round_latency_s"] = jnp.max(group_latency)
    out["extra"] = {
        "group_latency_s": group_latency,
        "round_compute_s": per_group(per_device["compute_s"])[slowest],
        "round_comm_s": per_group(per_device["comm_s"])[slowest],
        "round_compute_energy_j": jnp.sum(per_device["compute_energy_j"]),
        "round_comm_energy_j": jnp.sum(per_device["comm_energy_j"]),
        "handover_bits": 2.0 * float(FLOAT_BITS) * workload.client_params * handovers,
    }
    return out


def fl_round_costs(
    devices: Devices,
    steps: jax.Array,
    power_w: jax.Array,
    bandwidth_hz: jax.Array,
    up_bits: jax.Array,
    workload: Workload,
    params: SystemParams,
    down_bits: jax.Array | int = FLOAT_BITS,
) -> dict[str, jax.Array]:
    """FedAvg with the whole model on each device (SPEC section 3): local compute of both
    segments, then ``32 (|w_c| + |w_s|)`` bits up and down once per round: every device's
    ``client_trip_costs`` of the whole model. Arguments and keys as ``sflam_round_costs`` (FL
    has no cut: ``up_bits`` and ``down_bits`` are unused)."""
    del up_bits, down_bits
    model = workload.client_params + workload.server_params
    trip = client_trip_costs(
        devices,
        steps,
        bandwidth_hz,
        power_w,
        3.0 * (workload.client_flops + workload.server_flops),
        workload.batch_size,
        model,
        model,
        params,
    )
    return _totals(
        trip["compute_s"], trip["comm_s"], trip["compute_energy_j"], trip["comm_energy_j"]
    )


def sl_round_costs(
    devices: Devices,
    steps: jax.Array,
    power_w: jax.Array,
    bandwidth_hz: jax.Array,
    up_bits: jax.Array,
    workload: Workload,
    params: SystemParams,
    down_bits: jax.Array | int = FLOAT_BITS,
) -> dict[str, jax.Array]:
    """Vanilla split learning: devices train one after another, each with the whole band and the
    whole server, and hand the client segment on through the server (``32 |w_c|`` bits up and
    down each). ``round_latency_s`` is the sum over devices. Arguments as ``sflam_round_costs``;
    ``bandwidth_hz`` is unused (each device has the whole band in its turn)."""
    del bandwidth_hz
    full_band = jnp.full_like(devices.gain, params.bandwidth_hz)
    per_device = sflam_round_costs(
        devices, steps, power_w, full_band, up_bits, workload, params, down_bits, server_copies=1
    )
    keys = ("compute_s", "comm_s", "compute_energy_j", "comm_energy_j")
    return _totals(*(per_device[k] for k in keys), serial=True)


def device_memory_bytes(params: int, activation_bytes: float, optimizer_slots: int = 1) -> float:
    """Training memory on a device: float32 parameters, gradients and ``optimizer_slots`` optimizer
    states per parameter (1 for SGD with momentum, 2 for Adam), plus the activations one batch
    keeps for the backward pass (SPEC section 3)."""
    return 4.0 * params * (2 + optimizer_slots) + activation_bytes


def sfl_v2_round_costs(
    devices: Devices,
    steps: jax.Array,
    power_w: jax.Array,
    bandwidth_hz: jax.Array,
    up_bits: jax.Array,
    workload: Workload,
    params: SystemParams,
    down_bits: jax.Array | int = FLOAT_BITS,
) -> dict[str, jax.Array]:
    """SFL-V2: SFL-V1's traffic and device work, one server segment serving the devices in turn.

    Each server step has the whole ``F_server`` (``t_srv = 3 B F_s / F_server``), but the server
    is busy for ``sum_k tau_k t_srv`` in all, so ``T_round = max(max_k T_k, sum_k tau_k t_srv)``
    with ``T_k`` as in SFL-V1 at one server copy. Device energy is SFL-V1's.
    """
    costs = sflam_round_costs(
        devices, steps, power_w, bandwidth_hz, up_bits, workload, params, down_bits, 1
    )
    t_srv = step_terms(devices, up_bits, workload, params, down_bits, server_copies=1)["t_srv"]
    busy = jnp.sum(jnp.asarray(steps, jnp.float32), -1) * t_srv
    costs["round_latency_s"] = jnp.maximum(costs["round_latency_s"], busy)
    return costs


def client_trip_costs(
    devices: Devices,
    steps: jax.Array,
    bandwidth_hz: float,
    power_w: float,
    flops_per_sample: float,
    batch_size: int,
    down_params: jax.Array,
    up_params: int,
    params: SystemParams,
) -> dict[str, jax.Array]:
    """One FL client's trip (SPEC sections 3 and 6.4; FL's round, FTTE's and FedBuff's trips):
    download ``down_params`` float32 values, ``steps`` local steps of ``batch_size`` samples at
    ``flops_per_sample`` (forward and backward of the trained part), upload ``up_params`` values
    (its model or delta), on a bandwidth share at a power (scalars or ``[C]``).

    Args:
      devices: ``[C]`` the dispatched devices (clock, channel).
      steps: ``[C]`` local steps tau_k.
      bandwidth_hz: each busy device's share of B (up and down).
      power_w: device transmit power.
      flops_per_sample: training FLOPs of one sample (XLA's cost analysis of the step).
      batch_size: B.
      down_params: ``[C]`` values downloaded (the whole model on a device's first trip, then w*).
      up_params: values uploaded.
      params: the system constants.

    Returns:
      ``[C]`` arrays ``time_s`` (download + compute + upload), ``compute_s``, ``comm_s``,
      ``energy_j`` (compute ``kappa f^2`` per cycle + ``p t_up``) with its ``compute_energy_j``
      and ``comm_energy_j``, and ``bytes`` (both ways).
    """
    n0 = params.noise_w_per_hz
    cycles = (
        jnp.asarray(steps, jnp.float32) * batch_size * flops_per_sample / params.flops_per_cycle
    )
    compute_s = cycles / devices.cpu_hz
    down_bits = float(FLOAT_BITS) * jnp.asarray(down_params, jnp.float32)
    up_bits = float(FLOAT_BITS) * up_params
    r_up = rate_bps(bandwidth_hz, power_w, devices.gain, n0)
    r_dn = rate_bps(bandwidth_hz, params.server_power_w, devices.gain, n0)
    up_s = up_bits / r_up
    comm_s = down_bits / r_dn + up_s
    compute_energy = params.kappa * devices.cpu_hz**2 * cycles
    comm_energy = power_w * up_s
    return {
        "time_s": compute_s + comm_s,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "energy_j": compute_energy + comm_energy,
        "compute_energy_j": compute_energy,
        "comm_energy_j": comm_energy,
        "bytes": (down_bits + up_bits) / 8.0,
    }
