"""GSFL: group-based split federated learning (SPEC section 6.1).

The S sampled clients of a round are split into M groups (``gsfl.groups``). Every group starts
from the global ``(w_c, w_s)`` and holds its own copy of both segments for the round. Inside a
group the clients train one after another as in vanilla split learning: client k runs its
``tau_k`` split steps (quantized cut, SFLAM's ``client_step``) on the group's pair, the server
copy's optimizer state carries on, and the client segment is handed to the next client. The
groups run side by side; at the end of the round both segments are averaged over the groups,
weighted by their samples: ``w = sum_m (N_m / N) w_m``.

One jitted round: ``jax.vmap`` over the groups (``train.chunk_size`` of them at once, 0 = all),
a ``lax.scan`` over the positions inside a group; a group shorter than the longest is padded with
no-op clients (no samples, so no step changes anything). ``groups = 1`` is SL and
``groups = S`` is SFL-V1 (SFLAM at the same bits); both are tests.

Grouping (``gsfl.grouping``, our reading of the paper): ``random`` cuts the round's sampling
order, which is uniformly random and redrawn every round from the round key, into M groups of
near-equal size (client i of the sample joins group ``i mod M``); ``balanced`` assigns the
clients longest predicted round time first to the group with the least time so far (LPT), which
keeps the slowest group short.

Costs: one client per group is active at a time, so M links share the band (``B / M`` each, full
power) and M server copies share ``F_server``; a group takes the sum of its clients' ``T_k``
(each includes downloading and uploading ``w_c``: the broadcast, the hand-overs between
consecutive clients, the aggregation upload) and ``T_round`` is the slowest group's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from sflam_jax import fields
from sflam_jax.algorithms.base import (
    Costs,
    Options,
    Protocol,
    RoundState,
    average_or_keep,
    health_flags,
)
from sflam_jax.algorithms.sfl_v2 import SharedServer
from sflam_jax.allocation.planner import PLAN_ENTRIES
from sflam_jax.data.batches import local_steps
from sflam_jax.quant import FLOAT_BITS
from sflam_jax.wireless.costs import grouped_totals, sflam_round_costs

GROUPINGS = ("random", "balanced")


def config_block() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.groups = 2  # M, groups training side by side (1 = SL, train.clients_per_round = SFL-V1)
    c.grouping = "random"  # "random" or "balanced" (module docstring)
    return c


def validate(cfg) -> None:
    s = cfg.train.clients_per_round
    groups = fields.integer(cfg, "gsfl.groups", 1, s, hi_name=f"train.clients_per_round={s}")
    fields.choice(cfg, "gsfl.grouping", GROUPINGS)
    if cfg.train.chunk_size > groups:
        fields.fail(
            "train.chunk_size",
            cfg.train.chunk_size,
            f"with gsfl it counts the groups trained side by side, so it must be <= "
            f"gsfl.groups={groups} (0 = all of them)",
        )


@dataclasses.dataclass(frozen=True)
class GroupOptions(Options):
    """GSFL's options: M, the grouping, groups side by side (``train.chunk_size``)."""

    groups: int
    grouping: str
    chunk_size: int

    @classmethod
    def from_config(cls, cfg) -> GroupOptions:
        return cls(cfg.gsfl.groups, cfg.gsfl.grouping, cfg.train.chunk_size)


def group_slots(groups: int, grouping: str, times: jax.Array) -> jax.Array:
    """The clients of each group in training order.

    Args:
      groups: M.
      grouping: ``"random"`` or ``"balanced"`` (module docstring).
      times: ``[S]`` the clients' predicted round times (``balanced`` only; any positive measure
        of their work will do).

    Returns:
      ``[P, M]`` int32: ``slots[p, m]`` is the position (in the round's sampling order) of the
      p-th client of group m, -1 where the group has fewer clients. P is ``ceil(S / M)`` for
      ``random`` and ``S - M + 1`` (the most one group can get) for ``balanced``.
    """
    s = times.shape[-1]
    if grouping == "random":
        p = -(-s // groups)
        slots = jnp.arange(p * groups, dtype=jnp.int32).reshape(p, groups)
        return jnp.where(slots < s, slots, -1)
    if grouping != "balanced":
        raise ValueError(f"gsfl.grouping={grouping!r} is unknown; allowed: {GROUPINGS}")

    def assign(carry, position):
        loads, depth, slots = carry
        group = jnp.argmin(loads)
        slots = slots.at[depth[group], group].set(position)
        return (loads.at[group].add(times[position]), depth.at[group].add(1), slots), None

    start = (
        jnp.zeros((groups,), times.dtype),
        jnp.zeros((groups,), jnp.int32),
        jnp.full((s - groups + 1, groups), -1, jnp.int32),
    )
    order = jnp.argsort(-times, stable=True).astype(jnp.int32)
    return jax.lax.scan(assign, start, order)[0][2]


def client_groups(slots: jax.Array, num_clients: int) -> jax.Array:
    """``[S]`` the group of each sampled client (sampling order) from ``[P, M]`` slots."""
    group = jnp.broadcast_to(jnp.arange(slots.shape[1], dtype=jnp.int32), slots.shape)
    where = jnp.where(slots >= 0, slots, num_clients)
    return (
        jnp.zeros((num_clients,), jnp.int32)
        .at[where.reshape(-1)]
        .set(group.reshape(-1), mode="drop")
    )


@dataclasses.dataclass(frozen=True)
class GroupRelay(SharedServer):
    """GSFL local training: split learning inside each group, groups side by side.

    Attributes (besides ``SplitTraining``'s):
      groups: M.
      grouping: ``"random"`` or ``"balanced"``; the planner's slots (``plan["slots"]``) take
        precedence, and without a planner ``balanced`` balances the clients' step counts.
      chunk_size: groups vmapped at once (0: all M).
    """

    groups: int = 1
    grouping: str = "random"
    chunk_size: int = 0
    relay_client: bool = True
    parallel = False

    def train_sequence(self, state: RoundState, plan: dict, rows_of):
        """One GSFL round of training and the FedAvg of the groups.

        Args:
          state: the round's global model.
          plan: ``{"clients", "counts", "up_bits", "keys"}`` each ``[S]`` in sampling order, and
            optionally ``"slots"`` ``[P, M]`` (``group_slots``).
          rows_of: ``[n]`` client ids -> their ``ClientRows [n, L, ...]``.

        Returns:
          As ``SharedServer.train_sequence``; ``computed`` counts the steps of the padded groups.
        """
        s = plan["counts"].shape[0]
        tau = local_steps(plan["counts"], self.batch_size, self.local_epochs)
        slots = plan.get("slots")
        if slots is None:
            slots = group_slots(self.groups, self.grouping, tau.astype(jnp.float32))
        p, m = slots.shape
        c = min(self.chunk_size or m, m)
        chunks = -(-m // c)
        slots = jnp.pad(slots, ((0, 0), (0, chunks * c - m)), constant_values=-1)
        slots = slots.reshape(p, chunks, c).transpose(1, 0, 2)  # [chunks, P, c]
        stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), tree)  # noqa: E731
        train = jax.vmap(self.train_client)

        def position(carry, where):
            params_c, params_s, opt_s = carry
            taken = where >= 0
            at = jnp.maximum(where, 0)
            counts = jnp.where(taken, plan["counts"][at], 0)
            bits = jnp.where(taken, plan["up_bits"][at], float(FLOAT_BITS))
            rows = rows_of(plan["clients"][at])
            params_c, params_s, opt_s, stats = train(
                params_c, params_s, opt_s, rows, counts, bits, plan["keys"][at]
            )
            flags = health_flags(stats, params_c, params_s)
            steps = jnp.max(jnp.where(taken, tau[at], 0)) * c
            return (params_c, params_s, opt_s), (stats, flags, counts, steps)

        def chunk(acc, where):
            sum_c, sum_s, stats, health, computed = acc
            start_s = stack(state.params_s)
            carry = (stack(state.params_c), start_s, jax.vmap(self.optimizer.init)(start_s))
            (params_c, params_s, _), (client_stats, flags, counts, steps) = jax.lax.scan(
                position, carry, where
            )
            weight = jnp.sum(counts, axis=0).astype(jnp.float32)  # N_m
            add = lambda total, x: jax.tree.map(  # noqa: E731
                lambda t, y: t + jnp.tensordot(weight, y, axes=1), total, x
            )
            index = jnp.where(where >= 0, where, s).reshape(-1)
            health = health.at[index].set(flags.reshape(-1, 3), mode="drop")
            stats = stats + jnp.sum(client_stats, axis=(0, 1))
            return (
                add(sum_c, params_c),
                add(sum_s, params_s),
                stats,
                health,
                computed + jnp.sum(steps),
            ), None

        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        start = (
            zeros(state.params_c),
            zeros(state.params_s),
            jnp.zeros((3,), jnp.float32),
            jnp.ones((s, 3), bool),
            jnp.zeros((), jnp.int32),
        )
        sum_c, sum_s, stats, health, computed = jax.lax.scan(chunk, start, slots)[0]
        weight = jnp.sum(plan["counts"]).astype(jnp.float32)
        return (
            average_or_keep(sum_c, weight, state.params_c),
            average_or_keep(sum_s, weight, state.params_s),
            stats,
            health.T,
            computed,
        )


def round_costs(
    devices,
    steps,
    power_w,
    bandwidth_hz,
    up_bits,
    workload,
    params,
    down_bits=FLOAT_BITS,
    groups: int = 1,
    grouping: str = "random",
) -> dict:
    """Latency and device energy of a GSFL round (SPEC section 6.1); arguments and keys as
    ``wireless.costs.sflam_round_costs``, ``bandwidth_hz`` unused (each of the M active links has
    ``B / M``). Adds ``extra``: the groups (``group_slots``, ``client_group``), their latencies,
    the slowest group's compute / communication split, the energy split and the hand-over
    traffic (``handover_bits``, up and down)."""
    del bandwidth_hz
    band = jnp.full_like(devices.gain, params.bandwidth_hz / groups)
    per_client = sflam_round_costs(
        devices, steps, power_w, band, up_bits, workload, params, down_bits, server_copies=groups
    )
    slots = group_slots(groups, grouping, per_client["latency_s"])
    costs = grouped_totals(per_client, slots, workload)
    costs["extra"].update(
        {PLAN_ENTRIES: {"slots": slots}, "client_group": client_groups(slots, steps.shape[-1])}
    )
    return costs


PROTOCOL = Protocol(
    name="gsfl",
    make=GroupRelay,
    costs=Costs(model=round_costs),
    quantized_cut=True,
    aqt=True,
    allocators=("equal",),
    config_block=config_block,
    validate=validate,
    options=GroupOptions,
)
