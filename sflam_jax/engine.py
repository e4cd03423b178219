"""The round engine: plan -> train -> aggregate, for any protocol, as one jit-able function.

A protocol's algorithm (``algorithms.registry``) knows how its clients train; the engine knows the
rest of a round:

1. ``round_plan``: sample S of the K clients, and with a planner draw their channels and allocate
   power, bandwidth and bits (SPEC sections 1, 3 and 4), all inside the jitted round;
2. train: an algorithm with ``parallel = True`` trains C clients side by side under ``jax.vmap``
   and the engine places them on the mesh: the client axis over the ``clients`` mesh axis, the
   server copies by the logical-axis rules (``sflam_jax.sharding``). Two schedules:
   ``"lanes"`` (the default, ``train_lanes``): C lanes, each working through its own queue of
   clients, the queues filled longest-first onto the least-loaded lane (LPT), so a lane whose
   client has finished adds it to the running FedAvg sums and starts its next client inside the
   jitted loop, and the lanes stay busy when the clients' step counts ``tau_k`` differ;
   ``"chunks"`` (``accumulate``): chunks of C clients, each run until its largest ``tau_k`` (the
   finished clients masked). Both carry only the running data-weighted sums, so memory holds C
   client copies however large S is. A sequential algorithm trains the round's clients in order
   and aggregates them itself (``train_sequence``);
3. aggregate (FedAvg ``rho_k = n_k / sum_j n_j`` for the parallel protocols) and
   ``finish_round``: the new state and the round's metrics.

``Engine.round`` runs the three in one program over a device-resident client table;
``sflam_jax.streaming`` drives the same pieces from the host, one block of chunks per call.

The engine interface: the trainer, the checkpointer and the sweep see every engine (this one, and
the event engine of the asynchronous protocols, ``sflam_jax.events``) through the same members:
``state_shardings(layout, initial)``, ``compile(state_shardings, client_data, seed) ->
round_fn(state, r)``, ``finished(state)`` (a stop rule besides ``num_rounds``),
``health_parts`` / ``health_advice`` (the words of ``base.check_health``) and the ``layout``
field. A protocol builds its engine through ``Protocol.engine``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax import quant, streams
from sflam_jax.algorithms.base import (
    HEALTH,
    HEALTH_ADVICE,
    HEALTH_PARTS,
    RoundState,
    average_or_keep,
    health_flags,
    sample_clients,
    weighted_sum,
)
from sflam_jax.allocation.planner import PLAN_ENTRIES
from sflam_jax.data.batches import ClientData, IndexedRows, gather_rows, local_steps

SCHEDULES = ("lanes", "chunks")


def _longest_first(tau: jax.Array) -> jax.Array:
    """Positions of ``tau`` in descending order (stable: ties keep the plan's order)."""
    return jnp.argsort(-tau, stable=True)


def _lpt_step(loads: jax.Array, tau: jax.Array):
    """One step of list scheduling: the next client (``tau`` steps) goes to the least-loaded
    lane. Returns ``(lane, whether it trains at all, new loads)``."""
    lane = jnp.argmin(loads)
    take = tau > 0
    return lane, take, loads.at[lane].add(jnp.where(take, tau, 0).astype(loads.dtype))


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
      schedule: ``"lanes"`` or ``"chunks"`` (module docstring).
      up_bits: the uplink bits of ``compile``'s round when there is no planner (the protocol's
        ``quant.up_bits``, or 32).
    """

    algorithm: Any
    clients_per_round: int
    chunk_size: int = 0
    planner: Callable | None = None
    layout: Any = None
    schedule: str = "lanes"
    up_bits: int = quant.FLOAT_BITS

    health_parts = HEALTH_PARTS
    health_advice = HEALTH_ADVICE

    # -- the engine interface ---------------------------------------------------------------

    def state_shardings(self, layout, initial: RoundState):
        """The round state's placement: client segment replicated, server segment by the
        layout's logical-axis rules."""
        return layout.state_shardings(initial)

    def compile(self, state_shardings, client_data: ClientData, seed: int):
        """``round_fn(state, r) -> (state, metrics)``: the jitted ``round`` over the
        device-resident client table, with round ``r``'s key (``streams.round_key``)."""
        replicated = self.layout.replicated
        jitted = jax.jit(
            lambda state, data, r: self.round(
                state, data, streams.round_key(seed, r), self.up_bits
            ),
            donate_argnums=0,
            in_shardings=(state_shardings, replicated, replicated),
            out_shardings=(state_shardings, replicated),
        )
        return lambda state, r: jitted(state, client_data, np.int32(r))

    def finished(self, state: RoundState) -> bool:
        """Rounds stop only at ``num_rounds``."""
        return False

    @property
    def chunk(self) -> int:
        """Clients side by side (lanes or chunk width), rounded up to a multiple of the mesh's
        ``clients`` axis."""
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
          planner the bits come from its allocation for the sampled clients, and its
          ``PLAN_ENTRIES`` join the plan (ESFL's ``"cuts"``, GSFL's ``"slots"``,
          ``algorithms.gsfl.group_slots``).
        """
        sample_key, train_key = jax.random.split(key)
        s = self.clients_per_round
        clients = sample_clients(sample_key, counts.shape[0], s)
        bits = jnp.broadcast_to(jnp.asarray(up_bits, jnp.float32), (s,))
        system = {}
        if self.planner is not None:
            steps = self.local_steps(counts[clients])
            bits, system = self.planner(streams.stream(key, streams.SYSTEM), steps, counts[clients])
        plan = {
            "clients": clients,
            "counts": counts[clients],
            "up_bits": bits.astype(jnp.float32),
            "keys": jax.vmap(lambda c: jax.random.fold_in(train_key, c))(clients),
        }
        # The planner's decisions beyond the bits, which its costs were computed for (ESFL's
        # per-device cuts, GSFL's groups as ``slots``).
        plan.update(system.pop(PLAN_ENTRIES, {}))
        return plan, system

    def in_chunks(self, plan: dict, slots: jax.Array) -> dict:
        """The plan laid out in slots ``[num_chunks, C]``.

        Args:
          plan: ``[S]`` arrays from ``round_plan``.
          slots: ``[num_chunks, C]`` int, the sampled client (its position in ``plan``) of each
            slot; -1 for an empty slot (count 0, the algorithm's ``empty_row``, never trained).
        """
        taken = slots >= 0
        pick = lambda x: jnp.where(taken, x[jnp.maximum(slots, 0)], 0)  # noqa: E731
        return {
            "positions": jnp.where(taken, slots, self.clients_per_round),
            "clients": pick(plan["clients"]),
            "counts": pick(plan["counts"]),
            "entries": self.entries(plan, slots),
            "keys": plan["keys"][jnp.maximum(slots, 0)],
        }

    def entries(self, plan: dict, positions: jax.Array):
        """The algorithm's ``plan_row`` of the clients at ``positions`` (any shape; -1: an empty
        slot, which gets its ``empty_row``)."""
        alg = self.algorithm
        taken = positions >= 0

        def pick(x, empty):
            where = taken.reshape(taken.shape + (1,) * (x.ndim - taken.ndim))
            return jnp.where(where, x, jnp.asarray(empty, x.dtype))

        got = alg.plan_row(plan, jnp.maximum(positions, 0))
        return jax.tree.map(pick, got, alg.empty_row())

    def natural_slots(self) -> jax.Array:
        """``[num_chunks, C]`` slots holding the S sampled clients in order, then empty ones."""
        total = self.num_chunks * self.chunk
        s = jnp.arange(total)
        return jnp.where(s < self.clients_per_round, s, -1).reshape(self.num_chunks, self.chunk)

    # -- 2. train (parallel protocols) ------------------------------------------------------

    def empty_sums(self, state: RoundState):
        """The running sums training adds to: the data-weighted averaged parameters (the
        algorithm's ``averaged`` parts of both segments), ``[3]`` stats, the total weight ``sum_k
        n_k``, the ``[S, 3]`` finite flags of the sampled clients (by their position in the plan;
        True until trained) and the client steps computed (useful or not)."""
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        avg_c, avg_s = self.algorithm.averaged(state.params_c, state.params_s)
        return (
            zeros(avg_c),
            zeros(avg_s),
            jnp.zeros((3,), jnp.float32),
            jnp.zeros((), jnp.float32),
            jnp.ones((self.clients_per_round, 3), bool),
            jnp.zeros((), jnp.int32),
        )

    def bound(self, state: RoundState) -> Engine:
        """The engine with its algorithm bound to the round's global state
        (``SplitTraining.for_round``: SFPrompt's frozen parts, which no lane copies)."""
        alg = self.algorithm.for_round(state)
        return self if alg is self.algorithm else dataclasses.replace(self, algorithm=alg)

    def stacked(self, state: RoundState, c: int):
        """The global segments broadcast to ``c`` client copies, placed on the mesh."""
        stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), tree)  # noqa: E731
        params_c, params_s = stack(state.params_c), stack(state.params_s)
        if self.layout is not None:
            params_c = self.layout.stacked(params_c, server=False)
            params_s = self.layout.stacked(params_s, server=True)
        return params_c, params_s

    def add_clients(self, sums, avg_c, avg_s, stats, weights, positions):
        """Adds C trained clients to the running sums.

        Args:
          sums: from ``empty_sums``.
          avg_c, avg_s: ``[C, ...]`` their averaged parameters (``client_result``).
          stats: ``[C, 3]`` summed loss, correct predictions, samples.
          weights: ``[C]`` FedAvg weights (``client_weight``; 0 for a lane or slot that adds
            nothing).
          positions: ``[C]`` their positions in the plan (out of range: no finite flags).
        """
        acc_c, acc_s, acc_stats, acc_w, health, computed = sums
        w = weights.astype(jnp.float32)
        acc_c = jax.tree.map(jnp.add, acc_c, weighted_sum(avg_c, w))
        acc_s = jax.tree.map(jnp.add, acc_s, weighted_sum(avg_s, w))
        health = health.at[positions].set(health_flags(stats, avg_c, avg_s), mode="drop")
        stats = acc_stats + jnp.sum(jnp.where(w[:, None] > 0, stats, 0.0), axis=0)
        return (acc_c, acc_s, stats, acc_w + jnp.sum(w), health, computed)

    def train_chunk(self, state: RoundState, rows, counts, entries, keys):
        """C clients' local training from the global model, placed on the mesh."""
        params_c, params_s = self.stacked(state, counts.shape[0])
        if self.layout is not None:
            rows = self.layout.client_major(rows)
        return self.algorithm.train_chunk(params_c, params_s, rows, counts, entries, keys)

    def accumulate(self, state: RoundState, sums, chunks: dict, rows_of: Callable):
        """The ``"chunks"`` schedule: trains the chunks ``[n, C]`` of ``chunks`` and adds them to
        ``sums``; a chunk runs until its largest ``tau_k``.

        Args:
          state: the round's global model.
          sums: from ``empty_sums`` or a previous call.
          chunks: ``{"positions", "clients", "counts", "entries", "keys"}`` each ``[n, C]``
            (``entries``: a pytree), plus whatever ``rows_of`` reads.
          rows_of: chunk -> ``ClientRows [C, L, ...]``, its clients' samples.
        """

        alg = self.algorithm

        def chunk_body(acc, chunk):
            counts, entries = chunk["counts"], chunk["entries"]
            avg_c, avg_s, stats = self.train_chunk(
                state, rows_of(chunk), counts, entries, chunk["keys"]
            )
            weights = alg.client_weight(counts, entries)
            acc = self.add_clients(acc, avg_c, avg_s, stats, weights, chunk["positions"])
            steps = jnp.max(alg.client_steps(counts, entries)) * counts.shape[0]
            return (*acc[:-1], acc[-1] + steps), None

        return jax.lax.scan(chunk_body, sums, chunks)[0]

    def lane_queues(self, counts: jax.Array, lanes: int) -> jax.Array:
        """``[lanes, S]`` each lane's clients (positions in ``counts``, -1 after the last), by
        longest-processing-time-first list scheduling: clients in descending ``tau_k`` go to the
        lane with the least work so far (ties: the lower lane). Clients without samples train
        nowhere. This is the order in which lanes that take the next client when they finish
        would receive them."""
        tau = self.local_steps(counts)
        s = tau.shape[0]

        def assign(carry, p):
            loads, depth, queues = carry
            lane, take, loads = _lpt_step(loads, tau[p])
            queues = queues.at[lane, depth[lane]].set(jnp.where(take, p, -1))
            depth = depth.at[lane].add(take.astype(jnp.int32))
            return (loads, depth, queues), None

        start = (
            jnp.zeros((lanes,), tau.dtype),
            jnp.zeros((lanes,), jnp.int32),
            jnp.full((lanes, s), -1, jnp.int32),
        )
        return jax.lax.scan(assign, start, _longest_first(tau))[0][2]

    def useful_share(self, counts: jax.Array, lanes: jax.Array, max_lanes: int) -> jax.Array:
        """Mean share of useful client steps when rounds of ``counts [R, S]`` clients run on
        ``lanes`` (traced, at most ``max_lanes``) lanes: ``sum_k tau_k / (lanes * the most loaded
        lane's steps)``, with the lanes filled as ``lane_queues`` fills them."""
        tau = self.local_steps(counts)

        def one(tau):
            closed = jnp.where(jnp.arange(max_lanes) < lanes, 0, jnp.iinfo(jnp.int32).max)
            loads = jax.lax.scan(
                lambda loads, t: (_lpt_step(loads, t)[2], None),
                closed.astype(jnp.int32),
                tau[_longest_first(tau)],
            )[0]
            busiest = jnp.max(jnp.where(jnp.arange(max_lanes) < lanes, loads, 0))
            return jnp.sum(tau) / jnp.maximum(lanes * busiest, 1)

        return jnp.mean(jax.vmap(one)(tau))

    def train_lanes(self, state: RoundState, sums, plan: dict, queues, table, index_of):
        """The ``"lanes"`` schedule: C lanes work through their queues and add each client to
        ``sums`` when it finishes, in one ``lax.while_loop`` that runs while any lane has work;
        each of its iterations steps all lanes until the next client finishes.

        Args:
          state: the round's global model.
          sums: from ``empty_sums`` or a previous call.
          plan: ``[S]`` arrays from ``round_plan``.
          queues: ``[C, D]`` each lane's clients (positions in ``plan``, -1 for none).
          table: ``(IndexedRows, its vmap axes)``: the samples the lanes read (shared, or one
            table per lane) without an ``index``.
          index_of: ``(positions [C], depth [C]) -> [C, L]`` the lanes' clients' index rows into
            the table (``depth``: the lane's queue entry).
        """
        alg = self.algorithm
        c, d = queues.shape
        rows_table, rows_axes = table
        lanes = jnp.arange(c)
        global_c, global_s = self.stacked(state, c)

        def load(ls, which):
            depth = jnp.where(which, ls["depth"] + 1, ls["depth"])
            entry = queues[lanes, jnp.minimum(depth, d - 1)]
            take = which & (depth < d) & (entry >= 0)
            pos = jnp.maximum(entry, 0)
            count = jnp.where(take, plan["counts"][pos], 0)
            index = index_of(pos, depth)
            width = index.shape[1]
            pick = lambda new, old: jax.tree.map(  # noqa: E731
                lambda x, y: jnp.where(take.reshape(-1, *([1] * (x.ndim - 1))), x, y), new, old
            )
            entry = pick(alg.plan_row(plan, pos), ls["entry"])
            rows = IndexedRows(rows_table.images, rows_table.labels, index)
            carry, orders, step_key = jax.vmap(
                lambda pc, ps, n, k, r, e: alg.client_start(pc, ps, n, k, width, r, e),
                in_axes=(0, 0, 0, 0, rows_axes, 0),
            )(global_c, global_s, count, plan["keys"][pos], rows, entry)
            count = jnp.where(which, count, ls["count"])
            return {
                **ls,
                "carry": pick(carry, ls["carry"]),
                "orders": pick(orders, ls["orders"]),
                "step_key": pick(step_key, ls["step_key"]),
                "index": pick(index, ls["index"]),
                "count": count,
                "entry": entry,
                "tau": alg.client_steps(count, entry),
                "t": jnp.where(which, 0, ls["t"]),
                "depth": depth,
                "pos": jnp.where(take, pos, ls["pos"]),
                "active": take | (ls["active"] & ~which),
            }

        def finish(ls, finished):
            avg_c, avg_s, stats = jax.vmap(alg.client_result)(ls["carry"])
            weights = jnp.where(finished, alg.client_weight(ls["count"], ls["entry"]), 0)
            positions = jnp.where(finished, ls["pos"], self.clients_per_round)
            acc = self.add_clients(ls["sums"], avg_c, avg_s, stats, weights, positions)
            return load({**ls, "sums": acc}, finished)

        def body(ls):
            # Step every lane until the next client finishes (no per-step test), then add the
            # finished ones to the sums and reload their lanes.
            rows = IndexedRows(rows_table.images, rows_table.labels, ls["index"])
            step_fn = jax.vmap(alg.client_step, in_axes=(0, rows_axes, 0, 0, 0, 0, 0))
            left = jnp.where(ls["active"], ls["tau"] - ls["t"], jnp.iinfo(jnp.int32).max)
            # 0 when no lane is busy: under vmap (vectorized sweeps) a finished point still runs
            # the body while other points work.
            run = jnp.where(jnp.any(ls["active"]), jnp.min(left), 0)
            carry = jax.lax.fori_loop(
                0,
                run,
                lambda i, carry: step_fn(
                    carry, rows, ls["count"], ls["orders"], ls["entry"], ls["step_key"], ls["t"] + i
                ),
                ls["carry"],
            )
            t = ls["t"] + run * ls["active"].astype(jnp.int32)
            acc = ls["sums"]
            ls = {**ls, "carry": carry, "t": t, "sums": (*acc[:-1], acc[-1] + run * c)}
            return finish(ls, ls["active"] & (t >= ls["tau"]))

        # Placeholders of the loaded lanes' shapes; every lane is loaded before the first step.
        index = jnp.zeros_like(index_of(lanes, lanes))
        start = {
            "carry": jax.vmap(alg.start_carry)(global_c, global_s),
            "orders": jnp.zeros((c, alg.local_epochs, index.shape[1]), jnp.int32),
            "step_key": plan["keys"][jnp.zeros((c,), jnp.int32)],
            "index": index,
            "count": jnp.zeros((c,), jnp.int32),
            "entry": self.entries(plan, jnp.full((c,), -1, jnp.int32)),
            "tau": jnp.zeros((c,), jnp.int32),
            "t": jnp.zeros((c,), jnp.int32),
            "depth": jnp.full((c,), -1, jnp.int32),
            "pos": jnp.zeros((c,), jnp.int32),
            "active": jnp.zeros((c,), bool),
            "sums": sums,
        }
        ls = load(start, jnp.ones((c,), bool))
        return jax.lax.while_loop(lambda ls: jnp.any(ls["active"]), body, ls)["sums"]

    # -- 3. aggregate -----------------------------------------------------------------------

    def average(self, state: RoundState, sums) -> tuple[dict, dict, jax.Array]:
        """FedAvg from the running sums (``rho_k = n_k / sum_j n_j``); returns the segments and
        the round's ``[3]`` stats."""
        sum_c, sum_s, stats, weight = sums[:4]
        alg = self.algorithm
        old_c, old_s = alg.averaged(state.params_c, state.params_s)
        params_c, params_s = alg.with_averaged(
            state.params_c,
            state.params_s,
            average_or_keep(sum_c, weight, old_c),
            average_or_keep(sum_s, weight, old_s),
        )
        return params_c, params_s, stats

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
          ids ``[S]``), ``useful_client_steps`` (``sum_k tau_k``), ``computed_client_steps``
          (client steps the schedule ran, masked ones included), ``HEALTH`` (``[3, S]`` finite
          flags, see ``base.check_health``) and, with a planner, its metrics plus the running
          ``sim_time_s`` and ``sim_energy_j``.
        """
        plan, system = self.round_plan(data.counts, key, up_bits)
        return self.train_plan(state, data, plan, system)

    def train_plan(self, state: RoundState, data: ClientData, plan: dict, system=None):
        """Trains and aggregates the clients of a given ``plan`` (``round_plan``'s, or one set
        by hand: the tests give ESFL's cuts this way); ``system``: the planner's metrics.
        Returns ``round``'s ``(new_state, metrics)``."""
        system = {} if system is None else system
        eng = self.bound(state)  # the round's own engine from here on
        if not eng.algorithm.parallel:
            params_c, params_s, stats, health, computed = eng.algorithm.train_sequence(
                state, plan, lambda ids: gather_rows(data, ids)
            )
            return eng.finish_round(
                state, system, params_c, params_s, stats, plan, health, computed
            )
        sums = eng.empty_sums(state)
        if eng.schedule == "chunks":
            chunks = eng.in_chunks(plan, eng.natural_slots())
            sums = eng.accumulate(state, sums, chunks, lambda c: gather_rows(data, c["clients"]))
        else:
            table = IndexedRows(data.images, data.labels, None)
            queues = eng.lane_queues(plan["counts"], eng.chunk)
            index_of = lambda pos, depth: data.index[plan["clients"][pos]]  # noqa: E731
            sums = eng.train_lanes(
                state, sums, plan, queues, (table, IndexedRows(None, None, 0)), index_of
            )
        return eng.finish_sums(state, system, sums, plan)

    def local_steps(self, counts):
        """``tau_k`` of clients holding ``counts`` samples."""
        return local_steps(counts, self.algorithm.batch_size, self.algorithm.local_epochs)

    def finish_sums(self, state, system, sums, plan):
        """FedAvg of the running sums, then ``finish_round``."""
        params_c, params_s, stats = self.average(state, sums)
        health, computed = sums[4], sums[5]
        return self.finish_round(state, system, params_c, params_s, stats, plan, health.T, computed)

    def finish_round(self, state, system, params_c, params_s, stats, plan, health, computed):
        """The new state and the round's metrics (shared by every protocol).

        Args:
          state: the state the round started from.
          system: the planner's metrics (empty without a planner).
          params_c, params_s: the new global segments.
          stats: ``[3]`` summed loss, correct predictions, samples.
          plan: ``[S]`` arrays from ``round_plan``, in sampling order.
          health: ``[3, S]`` finite flags in the same order.
          computed: client steps the schedule ran.
        """
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
            "clients": plan["clients"],
            "useful_client_steps": jnp.sum(
                self.algorithm.client_steps(
                    plan["counts"], self.entries(plan, jnp.arange(plan["counts"].shape[0]))
                )
            ),
            "computed_client_steps": computed,
            HEALTH: health,
            **system,
        }
        if system:
            metrics.update(sim_time_s=sim_time, sim_energy_j=sim_energy)
        return new_state, metrics
