"""The event-driven engine of the asynchronous protocols (FTTE, FedBuff; SPEC section 6.4).

The server keeps C clients busy on a simulated clock. ``EventEngine.step`` runs the loop up to the
next server version, as one jit-able function of the whole ``AsyncState``:

1. **dispatch**: every free slot gets a client at the current version, K at a time: clients not in
   flight, uniformly without replacement; they train together in one vmapped call from the
   current global model (padded to the longest ``tau_k`` and masked); each one's trip (download,
   local compute, upload; SPEC section 3, times its straggler slow-down) fixes its arrival time.
   Results wait in their slot until they arrive. At version 0 all C slots are free (``C / K``
   dispatches);
2. **arrivals**: the in-flight slots form a min-heap on ``(arrival time, dispatch number)``: the K
   earliest are popped in that order (ties go to the earlier dispatch), the clock moves to the
   K-th arrival;
3. **aggregate**: ``w* <- w* + eta_g sum_i a_i Delta_i / sum_i a_i``
   (the protocol's buffer rule), the version is bumped, and the K slots are free for the next
   step's dispatch.

Randomness: dispatch ``d`` (the count of clients dispatched before it) draws its clients and
devices from ``fold_in(stream, d)`` and client ``seq``'s training key is ``training_key(run_key,
seq)``; with the state's counters that is the whole key stream, so a checkpoint of the state
resumes exactly.

The engine knows no protocol: a protocol module (``algorithms.ftte``) builds it with its client
training, its buffer rule and its words for the health check (``Protocol.engine``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax import streams
from sflam_jax.algorithms import sparse
from sflam_jax.algorithms.base import HEALTH, average_or_keep, health_flags, weighted_sum
from sflam_jax.data.batches import ClientData, gather_rows, local_steps
from sflam_jax.models import split as split_lib
from sflam_jax.wireless.channel import SystemParams, draw_devices
from sflam_jax.wireless.costs import client_trip_costs

# What the three ``HEALTH`` flags of a version check (``base.check_health``).
HEALTH_PARTS = ("loss", "update", "server")


def training_key(run_key: jax.Array, seq) -> jax.Array:
    """The local-training key of the ``seq``-th dispatched client (0-based)."""
    return jax.random.fold_in(streams.stream(run_key, streams.TRAIN), seq)


def straggler_slowdowns(run_key: jax.Array, num_clients: int, fraction: float, slowdown: float):
    """``[K]`` trip-time factors: ``round(fraction K)`` devices, drawn once from the run key, take
    ``slowdown`` times longer; the rest 1."""
    stragglers = int(round(fraction * num_clients))
    order = np.asarray(
        jax.random.permutation(streams.stream(run_key, streams.STRAGGLER), num_clients)
    )
    factors = np.ones(num_clients, np.float32)
    factors[order[:stragglers]] = slowdown
    return factors


def device_memories(run_key: jax.Array, num_clients: int, low: float, high: float) -> np.ndarray:
    """``[K]`` training memory of every device in bytes, ~ U[low, high], drawn once from the run
    key (FTTE's default budget is the smallest)."""
    key = streams.stream(run_key, streams.MEMORY)
    u = np.asarray(jax.random.uniform(key, (num_clients,)), np.float64)
    return low + u * (high - low)


@flax.struct.dataclass
class Flight:
    """The C slots of clients in flight (``[C]`` arrays; a free slot's entries are stale).

    Attributes:
      busy: whether the slot holds a client.
      client: its id.
      version: the global version it started from.
      seq: its dispatch number (tie-break of equal arrivals, training key).
      arrival_s: simulated time its update reaches the server.
      count: its samples n_i.
      sigma2: mean squared deviation of its step gradients (variance weight).
      stats: ``[C, 3]`` summed loss, correct predictions, samples of its local training.
      energy_j: device energy of its trip.
      bytes: bytes its trip moves (down and up).
      delta: ``[C, ...]`` its change of ``w*`` (``sparse.take`` tree).
    """

    busy: jax.Array
    client: jax.Array
    version: jax.Array
    seq: jax.Array
    arrival_s: jax.Array
    count: jax.Array
    sigma2: jax.Array
    stats: jax.Array
    energy_j: jax.Array
    bytes: jax.Array
    delta: dict


@flax.struct.dataclass
class AsyncState:
    """Everything the event loop carries (checkpointed whole).

    Attributes:
      round: int32, server versions so far (the trainer's rounds).
      params_c, params_s: the global model, cut at ``model.cut_layer`` like the other protocols'
        (evaluation and checkpoints see the usual segments).
      sim_time_s: the simulated clock: time of the last server update.
      sim_energy_j: device energy of the arrived trips.
      sim_bytes: bytes moved by the arrived trips (downloads and uploads).
      dispatched: clients dispatched so far (the key stream's counter).
      seen: ``[K]`` bool, devices that hold the frozen part (downloaded the whole model once).
      flight: the in-flight clients with their results.
    """

    round: jax.Array
    params_c: dict
    params_s: dict
    sim_time_s: jax.Array
    sim_energy_j: jax.Array
    sim_bytes: jax.Array
    dispatched: jax.Array
    seen: jax.Array
    flight: Flight

    @classmethod
    def create(
        cls, params_c: dict, params_s: dict, subset: frozenset, concurrency: int, num_clients: int
    ):
        """The state before the first version: nothing in flight."""
        c = concurrency
        whole = split_lib.merge_params(params_c, params_s)
        delta = jax.tree.map(
            lambda x: jnp.zeros((c, *x.shape), x.dtype), sparse.take(whole, subset)
        )
        zero = lambda dtype=jnp.float32: jnp.zeros((), dtype)  # noqa: E731
        flight = Flight(
            busy=jnp.zeros((c,), bool),
            client=jnp.zeros((c,), jnp.int32),
            version=jnp.zeros((c,), jnp.int32),
            seq=jnp.zeros((c,), jnp.int32),
            arrival_s=jnp.zeros((c,), jnp.float32),
            count=jnp.zeros((c,), jnp.int32),
            sigma2=jnp.zeros((c,), jnp.float32),
            stats=jnp.zeros((c, 3), jnp.float32),
            energy_j=jnp.zeros((c,), jnp.float32),
            bytes=jnp.zeros((c,), jnp.float32),
            delta=delta,
        )
        return cls(
            round=zero(jnp.int32),
            params_c=params_c,
            params_s=params_s,
            sim_time_s=zero(),
            sim_energy_j=zero(),
            sim_bytes=zero(),
            dispatched=zero(jnp.int32),
            seen=jnp.zeros((num_clients,), bool),
            flight=flight,
        )


@dataclasses.dataclass(frozen=True)
class EventEngine:
    """An asynchronous protocol's event loop; the trainer drives it through the engine interface
    (``state_shardings``, ``compile``, ``finished``, ``health_parts``, ``health_advice``) like the
    round engine (``engine.Engine``).

    Attributes:
      clients: the local training of ``w*``: ``train_batch(params, rows, counts, keys) -> (delta,
        stats, sigma2)``, with ``subset``, ``batch_size`` and ``local_epochs``
        (``algorithms.ftte.SparseClients``).
      rule: the buffer's weights and server step: ``weights(counts, staleness, sigma2) -> [K]``
        and ``server_lr`` (``algorithms.ftte.BufferRule``).
      concurrency: C, clients busy at once.
      buffer_size: K, arrivals per server update.
      num_clients: the population.
      cut_layer: where the global model is kept split (``model.cut_layer``).
      depth: the ViT's blocks.
      system: the wireless and compute constants.
      cost: memory, FLOPs per sample and size of training ``w*`` (``sparse.SubsetCost``).
      total_params: values of the whole model (a device's first download).
      slowdown: ``[num_clients]`` trip-time factors (stragglers).
      health_advice: what to change when a version's health check fails (the protocol's fields).
      stop_sim_seconds: stop once the simulated clock passes this; 0: after the trainer's rounds.
      layout: ``sharding.Layout`` the trainer places the (replicated) state with; None: default.
    """

    clients: Any
    rule: Any
    concurrency: int
    buffer_size: int
    num_clients: int
    cut_layer: int
    depth: int
    system: SystemParams
    cost: sparse.SubsetCost
    total_params: int
    slowdown: np.ndarray
    health_advice: str = "Lower optimizer.learning_rate"
    stop_sim_seconds: float = 0.0
    layout: Any = None

    health_parts = HEALTH_PARTS

    # -- the engine interface -----------------------------------------------------------------

    def state_shardings(self, layout, initial: AsyncState):
        """The event loop's state (model, in-flight results) is replicated."""
        return jax.tree.map(lambda _: layout.replicated, initial)

    def compile(self, state_shardings, client_data: ClientData, seed: int):
        """``round_fn(state, r) -> (state, metrics)``: one jitted ``step`` (the next server
        version) over the device-resident client table; ``r`` is not needed (the state's counters
        carry the key stream)."""
        key = streams.run_key(seed)
        replicated = self.layout.replicated
        step = jax.jit(
            lambda state, data: self.step(state, data, key),
            donate_argnums=0,
            in_shardings=(state_shardings, replicated),
            out_shardings=(state_shardings, replicated),
        )
        return lambda state, r: step(state, client_data)

    def finished(self, state: AsyncState) -> bool:
        """Whether the simulated clock has passed ``stop_sim_seconds`` (host read)."""
        return 0 < self.stop_sim_seconds <= float(state.sim_time_s)

    @property
    def subset_params(self) -> int:
        return self.cost.params

    def whole(self, state: AsyncState) -> dict:
        return split_lib.merge_params(state.params_c, state.params_s)

    def local_steps(self, counts):
        return local_steps(counts, self.clients.batch_size, self.clients.local_epochs)

    # -- 1. dispatch --------------------------------------------------------------------------

    def trip(self, key: jax.Array, counts: jax.Array, first: jax.Array, clients: jax.Array):
        """The trips of K dispatched clients: ``client_trip_costs`` on fresh device draws (equal
        bandwidth shares B / C at full power), the time stretched by the straggler factor."""
        devices = draw_devices(key, counts.shape[0], self.system)
        costs = client_trip_costs(
            devices,
            self.local_steps(counts),
            self.system.bandwidth_hz / self.concurrency,
            self.system.p_max_w,
            self.cost.flops_per_sample,
            self.clients.batch_size,
            jnp.where(first, self.total_params, self.subset_params),
            self.subset_params,
            self.system,
        )
        factor = jnp.asarray(self.slowdown)[clients]
        return {**costs, "time_s": costs["time_s"] * factor}

    def draw_dispatch(self, run_key, dispatched, in_flight, seen, counts):
        """Who the next dispatch sends and what their trips cost, before training.

        Args:
          run_key: the run's key.
          dispatched: clients dispatched before this dispatch.
          in_flight: ``[num_clients]`` bool, clients busy now (never drawn).
          seen: ``[num_clients]`` bool, devices that downloaded the whole model before.
          counts: ``[num_clients]`` samples of every client.

        Returns:
          ``{"clients", "counts", "keys", "seq", "time_s", "energy_j", "bytes"}`` of K clients in
          draw order; a dispatch that fills fewer slots uses the first ones.
        """
        k = self.buffer_size
        key = jax.random.fold_in(streams.stream(run_key, streams.DISPATCH), dispatched)
        pick_key, device_key = jax.random.split(key)
        u = jnp.where(in_flight, 2.0, jax.random.uniform(pick_key, (self.num_clients,)))
        clients = jnp.argsort(u, stable=True)[:k].astype(jnp.int32)
        seq = dispatched + jnp.arange(k, dtype=jnp.int32)
        n = counts[clients]
        costs = self.trip(device_key, n, ~seen[clients], clients)
        return {
            "clients": clients,
            "counts": n,
            "keys": jax.vmap(lambda s: training_key(run_key, s))(seq),
            "seq": seq,
            "time_s": costs["time_s"],
            "energy_j": costs["energy_j"],
            "bytes": costs["bytes"],
        }

    def dispatch(self, state: AsyncState, data: ClientData, run_key) -> AsyncState:
        """Fills up to K free slots with clients trained from the current version."""
        f = state.flight
        k = self.buffer_size
        slots = jnp.argsort(f.busy, stable=True)[:k]  # free slots first, in slot order
        n = jnp.minimum(k, jnp.sum(~f.busy))
        take = jnp.arange(k) < n
        in_flight = (
            jnp.zeros((self.num_clients,), jnp.int32).at[f.client].max(f.busy.astype(jnp.int32)) > 0
        )
        d = self.draw_dispatch(run_key, state.dispatched, in_flight, state.seen, data.counts)
        counts = jnp.where(take, d["counts"], 0)
        delta, stats, sigma2 = self.clients.train_batch(
            self.whole(state), gather_rows(data, d["clients"]), counts, d["keys"]
        )

        def put(old, new):
            t = take.reshape(-1, *([1] * (new.ndim - 1)))
            return old.at[slots].set(jnp.where(t, new, old[slots]))

        flight = Flight(
            busy=put(f.busy, take),
            client=put(f.client, d["clients"]),
            version=put(f.version, jnp.full((k,), state.round)),
            seq=put(f.seq, d["seq"]),
            arrival_s=put(f.arrival_s, state.sim_time_s + d["time_s"]),
            count=put(f.count, counts),
            sigma2=put(f.sigma2, sigma2),
            stats=put(f.stats, stats),
            energy_j=put(f.energy_j, d["energy_j"]),
            bytes=put(f.bytes, d["bytes"]),
            delta=jax.tree.map(put, f.delta, delta),
        )
        seen = state.seen | jnp.zeros_like(state.seen).at[d["clients"]].set(take)
        return state.replace(flight=flight, seen=seen, dispatched=state.dispatched + n)

    # -- 2. arrivals and 3. aggregate ---------------------------------------------------------

    def arrivals(self, flight: Flight) -> jax.Array:
        """``[K]`` slots of the K earliest arrivals, in heap order ``(arrival_s, seq)``."""
        time = jnp.where(flight.busy, flight.arrival_s, jnp.inf)
        return jnp.lexsort((flight.seq, time))[: self.buffer_size]

    def step(self, state: AsyncState, data: ClientData, run_key) -> tuple[AsyncState, dict]:
        """Dispatch into the free slots, pop K arrivals, apply the buffer: the next version.

        Returns:
          ``(state, metrics)``; metrics of the buffer: ``train_loss``, ``train_accuracy``,
          ``samples``, ``clients`` ``[K]`` (in arrival order), ``arrival_s`` ``[K]``,
          ``arrival_seq`` ``[K]``, ``staleness`` ``[K]``, ``buffer_weights`` ``[K]`` (``a_i``
          normalised), ``sim_time_s``, ``sim_energy_j``, ``sim_bytes``, ``dispatched`` and
          ``HEALTH`` (``[3, K]``: finite loss, finite delta, True).
        """
        state = jax.lax.while_loop(
            lambda s: jnp.any(~s.flight.busy),
            lambda s: self.dispatch(s, data, run_key),
            state,
        )
        f = state.flight
        slots = self.arrivals(f)
        staleness = state.round - f.version[slots]
        a = self.rule.weights(f.count[slots], staleness, f.sigma2[slots])
        total = jnp.sum(a)
        deltas = jax.tree.map(lambda x: x[slots], f.delta)
        # The weighted mean delta, or none when the buffer carries no weight (no samples).
        zero = jax.tree.map(lambda x: jnp.zeros_like(x[0]), deltas)
        mean = average_or_keep(weighted_sum(deltas, a), total, zero)
        whole = self.whole(state)
        subset = sparse.take(whole, self.clients.subset)
        stepped = jax.tree.map(lambda w, d: w + self.rule.server_lr * d, subset, mean)
        new = sparse.overlay(whole, stepped)
        params_c, params_s = split_lib.split_params(new, self.cut_layer, self.depth)
        stats = jnp.sum(f.stats[slots], axis=0)
        energy = state.sim_energy_j + jnp.sum(f.energy_j[slots])
        moved = state.sim_bytes + jnp.sum(f.bytes[slots])
        clock = jnp.max(f.arrival_s[slots])
        new_state = state.replace(
            round=state.round + 1,
            params_c=params_c,
            params_s=params_s,
            sim_time_s=clock,
            sim_energy_j=energy,
            sim_bytes=moved,
            flight=f.replace(busy=f.busy.at[slots].set(False)),
        )
        health = health_flags(f.stats[slots], deltas).T
        metrics = {
            "train_loss": stats[0] / stats[2],
            "train_accuracy": stats[1] / stats[2],
            "samples": stats[2],
            "clients": f.client[slots],
            "arrival_s": f.arrival_s[slots],
            "arrival_seq": f.seq[slots],
            "staleness": staleness,
            "buffer_weights": a / jnp.where(total > 0, total, 1.0),
            "sim_time_s": clock,
            "sim_energy_j": energy,
            "sim_bytes": moved,
            "dispatched": state.dispatched,
            HEALTH: health,
        }
        return new_state, metrics
