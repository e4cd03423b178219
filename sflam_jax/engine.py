"""The round engine: plan -> train -> aggregate, for any protocol, as one jit-able function.

A protocol's algorithm (``algorithms.registry``) knows how its clients train; the engine knows the
rest of a round:

1. ``round_plan``: sample S of the K clients, and with a planner draw their channels and allocate
   power, bandwidth and bits (SPEC sections 1, 3 and 4), all inside the jitted round;
2. train: an algorithm with ``parallel = True`` trains chunks of C clients side by side
   (``train_chunk`` under ``jax.vmap``) and the engine places each chunk on the mesh: the client
   axis over the ``clients`` mesh axis, the server copies by the logical-axis rules
   (``sflam_jax.sharding``). ``accumulate`` scans over the chunks carrying only the running
   data-weighted sums, so memory holds C client copies however large S is. A sequential algorithm
   trains the round's clients in order and aggregates them itself (``train_sequence``);
3. aggregate (FedAvg ``rho_k = n_k / sum_j n_j`` for the parallel protocols) and
   ``finish_round``: the new state and the round's metrics.

``Engine.round`` runs the three in one program over a device-resident client table;
``sflam_jax.streaming`` drives the same pieces from the host, one block of chunks per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sflam_jax import quant
from sflam_jax.algorithms.base import (
    HEALTH,
    RoundState,
    average_or_keep,
    finite_per_client,
    sample_clients,
    weighted_sum,
)
from sflam_jax.data.batches import ClientData, gather_rows, local_steps

# fold_in constant of the round key's system-model stream (channel draws), apart from the
# client-sampling and training streams that jax.random.split(key) gives.
_SYSTEM_STREAM = 0x5157


@dataclasses.dataclass(frozen=True)
class Engine:
    """One protocol's round on a mesh.

    Attributes:
      algorithm: the protocol's training (``Protocol.make(...)``).
      clients_per_round: S.
      chunk_size: clients vmapped at once (0: all S at once); parallel algorithms only.
      planner: per-round resource planning (channel, allocation, costs); None skips the system
        model and uses the ``up_bits`` given to ``round``.
      layout: ``sharding.Layout`` placing the client axis and the server segment on a mesh; None
        leaves placement to XLA (one device).
    """

    algorithm: Any
    clients_per_round: int
    chunk_size: int = 0
    planner: Callable | None = None
    layout: Any = None

    @property
    def chunk(self) -> int:
        """Clients per chunk, rounded up to a multiple of the mesh's ``clients`` axis."""
        multiple = self.layout.client_shards if self.layout is not None else 1
        return -(-(self.chunk_size or self.clients_per_round) // multiple) * multiple

    @property
    def num_chunks(self) -> int:
        return -(-self.clients_per_round // self.chunk)

    # -- 1. plan ----------------------------------------------------------------------------

    def round_plan(self, counts: jax.Array, key: jax.Array, up_bits):
        """Which clients train this round and with which bits, in sampling order.

        Args:
          counts: ``[K]`` samples of every client.
          key: the round's key.
          up_bits: the uplink bits when there is no planner (scalar or ``[S]``).

        Returns:
          ``({"clients", "counts", "up_bits", "keys"} each [S], system metrics)``; with a
          planner the bits come from its allocation for the sampled clients.
        """
        sample_key, train_key = jax.random.split(key)
        s = self.clients_per_round
        algorithm = self.algorithm
        clients = sample_clients(sample_key, counts.shape[0], s)
        bits = jnp.broadcast_to(jnp.asarray(up_bits, jnp.float32), (s,))
        system = {}
        if self.planner is not None:
            steps = local_steps(counts[clients], algorithm.batch_size, algorithm.local_epochs)
            bits, system = self.planner(
                jax.random.fold_in(key, _SYSTEM_STREAM), steps, counts[clients]
            )
        plan = {
            "clients": clients,
            "counts": counts[clients],
            "up_bits": bits.astype(jnp.float32),
            "keys": jax.vmap(lambda c: jax.random.fold_in(train_key, c))(clients),
        }
        return plan, system

    def in_chunks(self, plan: dict, slots: jax.Array) -> dict:
        """The plan laid out in slots ``[num_chunks, C]``.

        Args:
          plan: ``[S]`` arrays from ``round_plan``.
          slots: ``[num_chunks, C]`` int, the sampled client (its position in ``plan``) of each
            slot; -1 for an empty slot (count 0, float bits, never trained).
        """
        taken = slots >= 0
        pick = lambda x: jnp.where(taken, x[jnp.maximum(slots, 0)], 0)  # noqa: E731
        out = {
            "clients": pick(plan["clients"]),
            "counts": pick(plan["counts"]),
            "up_bits": jnp.where(
                taken, plan["up_bits"][jnp.maximum(slots, 0)], float(quant.FLOAT_BITS)
            ),
        }
        out["keys"] = plan["keys"][jnp.maximum(slots, 0)]
        return out

    def natural_slots(self) -> jax.Array:
        """``[num_chunks, C]`` slots holding the S sampled clients in order, then empty ones."""
        total = self.num_chunks * self.chunk
        s = jnp.arange(total)
        return jnp.where(s < self.clients_per_round, s, -1).reshape(self.num_chunks, self.chunk)

    # -- 2. train (parallel protocols) ------------------------------------------------------

    def empty_sums(self, state: RoundState):
        """The running sums ``accumulate`` adds to: the data-weighted segments, ``[3]`` stats and
        the total weight ``sum_k n_k``."""
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        return (
            zeros(state.params_c),
            zeros(state.params_s),
            jnp.zeros((3,), jnp.float32),
            jnp.zeros((), jnp.float32),
        )

    def train_chunk(self, state: RoundState, rows, counts, up_bits, keys):
        """C clients' local training from the global model, placed on the mesh."""
        c = counts.shape[0]
        stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), tree)  # noqa: E731
        params_c, params_s = stack(state.params_c), stack(state.params_s)
        if self.layout is not None:
            params_c = self.layout.stacked(params_c, server=False)
            params_s = self.layout.stacked(params_s, server=True)
            rows = self.layout.client_major(rows)
        return self.algorithm.train_chunk(params_c, params_s, rows, counts, up_bits, keys)

    def accumulate(self, state: RoundState, sums, chunks: dict, rows_of: Callable):
        """Trains the chunks ``[n, C]`` of ``chunks`` and adds them to ``sums``.

        Args:
          state: the round's global model.
          sums: from ``empty_sums`` or a previous call.
          chunks: ``{"clients", "counts", "up_bits", "keys"}`` each ``[n, C]``, plus whatever
            ``rows_of`` reads.
          rows_of: chunk -> ``ClientRows [C, L, ...]``, its clients' samples.

        Returns:
          ``(sums, health [n, 3, C])`` with the finite flags of every slot.
        """

        def chunk_body(acc, chunk):
            params_c, params_s, stats = self.train_chunk(
                state, rows_of(chunk), chunk["counts"], chunk["up_bits"], chunk["keys"]
            )
            w = chunk["counts"].astype(jnp.float32)
            acc_c, acc_s, acc_stats, acc_w = acc
            acc_c = jax.tree.map(jnp.add, acc_c, weighted_sum(params_c, w))
            acc_s = jax.tree.map(jnp.add, acc_s, weighted_sum(params_s, w))
            health = jnp.stack(
                [
                    jnp.isfinite(stats[:, 0]),
                    finite_per_client(params_c),
                    finite_per_client(params_s),
                ]
            )
            return (acc_c, acc_s, acc_stats + jnp.sum(stats, axis=0), acc_w + jnp.sum(w)), health

        return jax.lax.scan(chunk_body, sums, chunks)

    # -- 3. aggregate -----------------------------------------------------------------------

    def average(self, state: RoundState, sums) -> tuple[dict, dict, jax.Array]:
        """FedAvg from the running sums (``rho_k = n_k / sum_j n_j``); returns the segments and
        the round's ``[3]`` stats."""
        sum_c, sum_s, stats, weight = sums
        return (
            average_or_keep(sum_c, weight, state.params_c),
            average_or_keep(sum_s, weight, state.params_s),
            stats,
        )

    def round(self, state: RoundState, data: ClientData, key: jax.Array, up_bits=32):
        """One round of the protocol.

        Args:
          state: global model after ``state.round`` rounds.
          data: the client table (device arrays).
          key: this round's key.
          up_bits: uplink bits without a planner, a scalar or ``[S]`` (one per sampled client, in
            sampling order).

        Returns:
          ``(new_state, metrics)`` with metrics ``train_loss``, ``train_accuracy`` (over all local
          samples of the round; NaN when there were none), ``samples``, ``clients`` (the sampled
          ids ``[S]``), ``HEALTH`` (``[3, S]`` finite flags, see ``base.check_health``) and, with a
          planner, its metrics plus the running ``sim_time_s`` and ``sim_energy_j``.
        """
        plan, system = self.round_plan(data.counts, key, up_bits)
        if not self.algorithm.parallel:
            params_c, params_s, stats, health = self.algorithm.train_sequence(
                state, plan, lambda ids: gather_rows(data, ids)
            )
            return self.finish_round(
                state, system, params_c, params_s, stats, plan["clients"], health
            )
        chunks = self.in_chunks(plan, self.natural_slots())
        sums, health = self.accumulate(
            state, self.empty_sums(state), chunks, lambda c: gather_rows(data, c["clients"])
        )
        params_c, params_s, stats = self.average(state, sums)
        # [3, S]: finite loss, client segment and server copy of each sampled client.
        health = jnp.moveaxis(health, 1, 0).reshape(3, -1)
        return self.finish_round(state, system, params_c, params_s, stats, plan["clients"], health)

    def finish_round(self, state, system, params_c, params_s, stats, clients, health):
        """The new state and the round's metrics (shared by every protocol).

        Args:
          state: the state the round started from.
          system: the planner's metrics (empty without a planner).
          params_c, params_s: the new global segments.
          stats: ``[3]`` summed loss, correct predictions, samples.
          clients: ``[S]`` client ids in sampling order.
          health: ``[3, >= S]`` finite flags in the same order (padding after the first S).
        """
        s = self.clients_per_round
        sim_time = state.sim_time_s + system.get("round_latency_s", 0.0)
        sim_energy = state.sim_energy_j + system.get("round_energy_j", 0.0)
        new_state = RoundState(
            round=state.round + 1,
            params_c=params_c,
            params_s=params_s,
            sim_time_s=sim_time,
            sim_energy_j=sim_energy,
        )
        metrics = {
            "train_loss": stats[0] / stats[2],
            "train_accuracy": stats[1] / stats[2],
            "samples": stats[2],
            "clients": clients[:s],
            HEALTH: health[:, :s],
            **system,
        }
        if system:
            metrics.update(sim_time_s=sim_time, sim_energy_j=sim_energy)
        return new_state, metrics
