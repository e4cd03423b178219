"""Per-round resource planning inside the jitted round: channel draw -> allocation -> costs."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax import streams
from sflam_jax.allocation import IN_GRAPH, cuts, joint
from sflam_jax.allocation.pgd import PGDOptions
from sflam_jax.allocation.problem import Weights, evaluate, make_problem
from sflam_jax.quant import FLOAT_BITS
from sflam_jax.wireless.channel import SystemParams, draw_devices
from sflam_jax.wireless.costs import Workload

# Planner metrics key of a dict of training inputs the engine moves into the round's plan: ``[S]``
# per-client entries (a per-device cut planner's ``cuts``) or GSFL's ``[P, M]`` group ``slots``
# (from its cost model's ``extra``).
PLAN_ENTRIES = "plan"


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


@dataclasses.dataclass(frozen=True)
class RoundPlanner:
    """Draws the devices' channels, allocates power, bandwidth and bits, and costs the round.

    Attributes:
      method: an in-graph solver name (see ``allocation.IN_GRAPH``).
      workload: FLOPs and sizes of the split model.
      params: wireless and compute constants.
      weights: objective weights, bit range and learning budget.
      cost_model: the protocol's round costs at the allocation (``wireless.costs``, common
        signature); they give ``round_latency_s`` and ``round_energy_j`` (so the simulated clock),
        and their ``extra`` dict joins the metrics as it is.
      cost_split: report the slowest device's compute / communication split and the energy split.
      comparisons: ``((name, cost_model), ...)`` reported as ``<name>_round_latency_s`` and
        ``<name>_round_energy_j`` at full power, equal bandwidth and float traffic (SPEC 3).
      fixed_bits: cut-layer bits for every device, or None to let the solver choose them.
      pgd: descent settings when ``method == "pgd"``.
      loads: the protocol's per-device loads for the solver (``allocation.problem.Problem``);
        None: SFL-V1's.
    """

    method: str
    workload: Workload
    params: SystemParams
    weights: Weights
    cost_model: Callable[..., dict]
    cost_split: bool = True
    comparisons: tuple = ()
    fixed_bits: int | None = None
    pgd: PGDOptions = PGDOptions()
    loads: Callable[..., dict] | None = None

    def __post_init__(self):
        if self.method not in IN_GRAPH:
            raise ValueError(
                f"allocation.method={self.method!r} is unknown; allowed: {sorted(IN_GRAPH)}"
            )

    def __call__(self, key: jax.Array, steps: jax.Array, counts: jax.Array):
        """Plans one round for S devices.

        Args:
          key: the round's system key (channel draw).
          steps: ``[S]`` local steps tau_k.
          counts: ``[S]`` samples n_k (FedAvg weights).

        Returns:
          ``(bits [S], metrics)``; metrics are scalars: latency and energy of the round (with
          their compute / communication split when ``cost_split``), the objective and the
          allocation statistics.
        """
        s = steps.shape[0]
        devices = draw_devices(key, s, self.params)
        rho = counts / jnp.maximum(jnp.sum(counts), 1)
        problem = make_problem(
            devices, steps, rho, self.workload, self.params, self.weights, self.loads, counts
        )  # a protocol's loads read the sample counts (SFPrompt prunes samples)
        bits = None if self.fixed_bits is None else jnp.full((s,), self.fixed_bits, jnp.float32)
        if self.method == "pgd":
            allocation, _ = IN_GRAPH["pgd"](problem, bits, self.pgd)
        else:
            allocation, _ = IN_GRAPH[self.method](problem, bits)
        solved = evaluate(problem, allocation)
        # A cost model that names ``counts`` (SFPrompt's, which prunes samples) gets them too.
        by_count = {"counts": counts} if "counts" in _parameters(self.cost_model) else {}
        costs = self.cost_model(
            devices,
            steps,
            allocation.power_w,
            allocation.bandwidth_hz,
            allocation.bits,
            self.workload,
            self.params,
            self.weights.down_bits,
            **by_count,
        )
        metrics = {
            **round_metrics(costs, allocation, self.cost_split),
            "objective": solved["objective"],
            "quant_error": solved["quant_error"],
        }
        # A cost model's own metrics (GSFL: its groups, their latencies, the hand-over traffic).
        metrics.update(costs.get("extra", {}))
        metrics.update(self.comparison_costs(devices, steps))
        return allocation.bits, metrics

    def comparison_costs(self, devices, steps) -> dict[str, jax.Array]:
        """T_round and E_round of the comparison protocols for the same devices (SPEC 3), each at
        full power with the band split equally and float cut-layer traffic."""
        s = steps.shape[0]
        full = jnp.full((s,), self.params.p_max_w)
        equal = jnp.full((s,), self.params.bandwidth_hz / s)
        floats = jnp.full((s,), float(FLOAT_BITS))
        out = {}
        for name, cost_model in self.comparisons:
            c = cost_model(
                devices, steps, full, equal, floats, self.workload, self.params, FLOAT_BITS
            )
            out[f"{name}_round_latency_s"] = c["round_latency_s"]
            out[f"{name}_round_energy_j"] = c["round_energy_j"]
        return out


# Solvers of the per-device cut problem (``allocation.cuts``) that run inside the jitted round.
CUT_SOLVERS = ("esfl_exact", "esfl_ao", "joint")


@dataclasses.dataclass(frozen=True)
class CutPlanner(RoundPlanner):
    """The planner of a protocol with per-device cuts and server shares (ESFL, SPEC 6.2).

    Besides the channel it draws each device's memory limit, then chooses cuts and server shares
    (``esfl_exact``, ``esfl_ao``: ``allocation.cuts`` at equal bandwidth, full power and the
    config's bits; ``joint``: ``allocation.joint``, with power, bandwidth and bits too) and costs
    the round at them. ``workload`` is a ``cuts.CutWorkload``; the chosen cuts (layers) join the
    round's plan.

    Attributes (besides ``RoundPlanner``'s):
      memory_bytes: ``(low, high)``, each device's training memory ``~ U[low, high]``.
      alternations: rounds of ``esfl_ao``.
    """

    memory_bytes: tuple[float, float] = (2.0**30, 2.0**30)
    alternations: int = 10

    def __post_init__(self):
        if self.method not in CUT_SOLVERS:
            raise ValueError(
                f"allocation.method={self.method!r} is unknown for per-device cuts; allowed: "
                f"{list(CUT_SOLVERS)}"
            )
        if self.fixed_bits is None and self.method != "joint":  # ESFL's validation says it first
            raise ValueError(f"allocation.method={self.method!r} needs fixed bits")

    def problem(self, key: jax.Array, steps: jax.Array) -> cuts.CutProblem:
        """The round's instance: the devices' channels, clocks and memory limits."""
        s = steps.shape[0]
        low, high = self.memory_bytes
        memory = jax.random.uniform(
            streams.stream(key, streams.MEMORY), (s,), minval=low, maxval=high
        )
        return cuts.CutProblem(
            devices=draw_devices(key, s, self.params),
            memory_bytes=memory,
            steps=jnp.asarray(steps, jnp.float32),
            table=self.workload.table(),
            batch_size=self.workload.batch_size,
            down_bits=self.weights.down_bits,
            params=self.params,
        )

    def __call__(self, key: jax.Array, steps: jax.Array, counts: jax.Array):
        """As ``RoundPlanner.__call__``; the metrics add the cuts' statistics, the server
        shares' range and ``memory_infeasible_device`` (the first device, by its position in the
        round's sample, whose memory fits no candidate cut; -1: none), and ``PLAN_ENTRIES``
        hands the cuts (``[S]`` layers) to the training."""
        s = steps.shape[0]
        problem = self.problem(key, steps)
        bits = None if self.fixed_bits is None else jnp.full((s,), self.fixed_bits, jnp.float32)
        extra = {}
        if self.method == "esfl_exact":
            allocation, diag = cuts.exact(problem, bits)
        elif self.method == "esfl_ao":
            allocation, diag = cuts.alternate(problem, bits, rounds=self.alternations)
        else:
            rho = counts / jnp.maximum(jnp.sum(counts), 1)
            at = self.workload.cuts.index(self.workload.cut_layer)
            options = joint.JointOptions(pgd=self.pgd)
            allocation, diag = joint.allocate(
                problem, rho, self.weights, self.workload, at, options, bits
            )
            extra = {"objective": diag["objective"], "quant_error": diag["quant_error"]}
        costs = cuts.round_costs(problem, allocation)
        layers = problem.table.cut[allocation.cut]
        metrics = {
            **round_metrics(costs, allocation, True),
            **extra,
            "cut_mean": jnp.mean(layers.astype(jnp.float32)),
            "cut_min": jnp.min(layers),
            "cut_max": jnp.max(layers),
            "server_share_min": jnp.min(allocation.server_flops) / self.params.server_flops,
            "server_share_max": jnp.max(allocation.server_flops) / self.params.server_flops,
            "memory_infeasible_device": diag["infeasible_device"],
            PLAN_ENTRIES: {"cuts": layers},
        }
        metrics.update(self.comparison_costs(problem.devices, steps))
        return allocation.bits, metrics


def round_metrics(costs: dict, allocation, cost_split: bool) -> dict[str, jax.Array]:
    """A round's latency and energy (with the slowest device's compute / communication split and
    the energy split when ``cost_split``) and the allocation's statistics."""
    metrics = {
        "round_latency_s": costs["round_latency_s"],
        "round_energy_j": costs["round_energy_j"],
        "bits_mean": jnp.mean(allocation.bits),
        "bits_min": jnp.min(allocation.bits),
        "bits_max": jnp.max(allocation.bits),
        "power_mean_w": jnp.mean(allocation.power_w),
        "bandwidth_min_hz": jnp.min(allocation.bandwidth_hz),
        "bandwidth_max_hz": jnp.max(allocation.bandwidth_hz),
    }
    if cost_split:
        slowest = jnp.argmax(costs["latency_s"])
        metrics.update(
            round_compute_s=costs["compute_s"][slowest],
            round_comm_s=costs["comm_s"][slowest],
            round_compute_energy_j=jnp.sum(costs["compute_energy_j"]),
            round_comm_energy_j=jnp.sum(costs["comm_energy_j"]),
        )
    return metrics


def sweep(
    planner: RoundPlanner, key: jax.Array, draws: int, steps: jax.Array, counts: jax.Array
) -> dict[str, np.ndarray]:
    """One round's plan for ``draws`` independent channel draws of the same S devices.

    All draws run as one ``jax.vmap``-ed, jit-compiled program (no Python loop over scenarios).

    Args:
      planner: the planner (method, workload, system constants, weights).
      key: key of the sweep; draw i uses ``jax.random.split(key, draws)[i]``.
      draws: number of channel draws.
      steps: ``[S]`` local steps tau_k.
      counts: ``[S]`` samples n_k.

    Returns:
      The planner's metrics as ``[draws]`` numpy arrays, plus ``bits`` ``[draws, S]`` and the
      per-client entries it hands the training (per-device cuts: ``cuts`` ``[draws, S]``).
    """
    keys = jax.random.split(key, draws)
    plan = jax.jit(jax.vmap(planner, in_axes=(0, None, None)))
    bits, metrics = plan(keys, jnp.asarray(steps, jnp.float32), jnp.asarray(counts, jnp.float32))
    metrics = {**metrics, **metrics.pop(PLAN_ENTRIES, {})}
    return {"bits": np.asarray(bits), **{k: np.asarray(v) for k, v in metrics.items()}}
