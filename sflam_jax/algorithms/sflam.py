"""SFLAM round: SFL-V1 with quantized cut-layer traffic (SPEC sections 1 and 2).

One round, for the S sampled clients, all inside one jit-able function:

1. every client starts from the global client segment ``w_c`` and its own copy of the global
   server segment ``w_s``;
2. ``tau_k = E * ceil(n_k / B)`` local steps: device forward, uplink quantization ``Q_{b_k}``,
   server forward and backward on the client's server copy, downlink quantization of
   ``dL/da_hat``, device backward (straight through the quantizer), an optimizer step on each side;
3. data-weighted FedAvg of both segments with ``rho_k = n_k / sum_j n_j``.

Clients run under ``jax.vmap``; with ``chunk_size = C`` they are processed C at a time by a
``lax.scan`` that carries only the running weighted sums, so memory holds C client copies however
large S is. The step loop of a chunk stops at the largest ``tau_k`` inside it; clients that are done
earlier keep their parameters (masked update).

The round is three pieces: ``round_plan`` (sampling and resource allocation, ``[S]`` arrays in
sampling order), ``accumulate`` (train chunks of clients and add their weighted segments to the
running sums) and ``finish_round``. ``round`` runs them in one jitted program on a device-resident
client table; ``algorithms.streaming`` drives the same pieces from the host, one block of chunks
per call, for data that lives on the host or across processes. With a ``layout``
(``sflam_jax.sharding``) the chunk's client axis is split over the mesh's ``clients`` axis and
the server copies follow the logical-axis rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sflam_jax import quant
from sflam_jax.algorithms.base import (
    HEALTH,
    Preprocess,
    RoundState,
    average_or_keep,
    finite_per_client,
    masked_cross_entropy,
    sample_clients,
    weighted_sum,
)
from sflam_jax.data.batches import (
    ClientData,
    ClientRows,
    client_batch,
    epoch_orders,
    gather_rows,
    local_steps,
)
from sflam_jax.models.split import SplitModel

# fold_in constant of the round key's system-model stream (channel draws), apart from the
# client-sampling and training streams that jax.random.split(key) gives.
_SYSTEM_STREAM = 0x5157


@dataclasses.dataclass(frozen=True)
class SFLAM:
    """The SFL-V1 round with cut-layer quantization.

    Attributes:
      model: the split ViT.
      optimizer: local optimizer of devices and server copies (fresh state every round).
      preprocess: uint8 images -> model inputs.
      clients_per_round: S.
      local_epochs: E.
      batch_size: B.
      down_bits: bits of the downlink gradient (32: float).
      chunk_size: clients vmapped at once (0: all S at once).
      planner: per-round resource planning (channel, allocation, costs); None skips the system
        model and uses the ``up_bits`` given to ``round``.
      layout: ``sharding.Layout`` placing the client axis and the server segment on a mesh; None
        leaves placement to XLA (one device).
    """

    model: SplitModel
    optimizer: optax.GradientTransformation
    preprocess: Preprocess
    clients_per_round: int
    local_epochs: int
    batch_size: int
    down_bits: int = 32
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

    # -- one client -------------------------------------------------------------------------

    def client_loss(self, params_c, params_s, images, labels, mask, up_bits, key):
        """Masked mean loss of one client's batch through the quantized cut.

        Returns ``(loss, (summed loss, correct predictions))``; its gradient with respect to
        ``params_c`` is the device's update direction given the quantized server gradient.
        """
        k_client, k_link, k_server = jax.random.split(key, 3)
        smashed = self.model.client_apply(params_c, self.preprocess(images), k_client)
        received = quant.cut_layer_channel(smashed, up_bits, self.down_bits, k_link)
        logits = self.model.server_apply(params_s, received, k_server)
        loss, total, correct = masked_cross_entropy(logits, labels, mask)
        return loss, (total, correct)

    def start_carry(self, params_c, params_s):
        """A client's local-training carry: both segments, fresh optimizer states, ``[3]`` stats
        (summed loss, correct predictions, samples seen)."""
        return (
            params_c,
            params_s,
            self.optimizer.init(params_c),
            self.optimizer.init(params_s),
            jnp.zeros((3,), jnp.float32),
        )

    def client_step(self, carry, rows: ClientRows, count, orders, up_bits, key, step):
        """One local step of one client and its server copy; a step with no samples is a no-op."""
        params_c, params_s, opt_c, opt_s, stats = carry
        images, labels, mask = client_batch(rows, count, orders, step, self.batch_size)
        grad_fn = jax.value_and_grad(self.client_loss, argnums=(0, 1), has_aux=True)
        (_, (total, correct)), (g_c, g_s) = grad_fn(
            params_c, params_s, images, labels, mask, up_bits, jax.random.fold_in(key, step)
        )
        upd_c, new_opt_c = self.optimizer.update(g_c, opt_c, params_c)
        upd_s, new_opt_s = self.optimizer.update(g_s, opt_s, params_s)
        active = jnp.any(mask)
        new = (
            optax.apply_updates(params_c, upd_c),
            optax.apply_updates(params_s, upd_s),
            new_opt_c,
            new_opt_s,
        )
        old = (params_c, params_s, opt_c, opt_s)
        kept = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
        n = jnp.sum(mask.astype(jnp.float32))
        return (*kept, stats + jnp.stack([total, correct, n]))

    # -- a chunk of clients -----------------------------------------------------------------

    def train_chunk(self, state: RoundState, rows: ClientRows, counts, up_bits, keys):
        """Local training of C clients from the global model; returns their stacked results.

        Args:
          state: the round's global model.
          rows: ``[C, L, ...]`` the clients' padded samples.
          counts: ``[C]`` samples of each (0 for padding slots).
          up_bits: ``[C]`` uplink bits.
          keys: ``[C]`` per-client keys.

        Returns:
          ``(params_c [C, ...], params_s [C, ...], stats [C, 3])`` with stats (summed loss,
          correct, samples seen).
        """
        width = rows.labels.shape[1]
        order_keys, step_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        orders = jax.vmap(lambda k, n: epoch_orders(k, n, width, self.local_epochs))(
            order_keys, counts
        )
        c = counts.shape[0]
        stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), tree)  # noqa: E731
        params_c, params_s = stack(state.params_c), stack(state.params_s)
        if self.layout is not None:
            params_c = self.layout.stacked(params_c, server=False)
            params_s = self.layout.stacked(params_s, server=True)
            rows = self.layout.client_major(rows)
        carry = jax.vmap(self.start_carry)(params_c, params_s)
        step_fn = jax.vmap(self.client_step, in_axes=(0, 0, 0, 0, 0, 0, None))
        num_steps = jnp.max(local_steps(counts, self.batch_size, self.local_epochs))
        carry = jax.lax.fori_loop(
            0,
            num_steps,
            lambda t, carry: step_fn(carry, rows, counts, orders, up_bits, step_keys, t),
            carry,
        )
        return carry[0], carry[1], carry[4]

    # -- the round --------------------------------------------------------------------------

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
        clients = sample_clients(sample_key, counts.shape[0], s)
        bits = jnp.broadcast_to(jnp.asarray(up_bits, jnp.float32), (s,))
        system = {}
        if self.planner is not None:
            steps = local_steps(counts[clients], self.batch_size, self.local_epochs)
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
        """One SFLAM round (SPEC section 1, SFL-V1).

        Args:
          state: global model after ``state.round`` rounds.
          data: the client table (device arrays).
          key: this round's key.
          up_bits: uplink bits, a scalar or ``[S]`` (one per sampled client, in sampling order).

        Returns:
          ``(new_state, metrics)`` with metrics ``train_loss``, ``train_accuracy`` (over all local
          samples of the round; NaN when there were none), ``samples``, ``clients`` (the sampled
          ids ``[S]``), ``HEALTH`` (``[3, S]`` finite flags, see ``base.check_health``) and, with a
          planner, its metrics plus the running ``sim_time_s`` and ``sim_energy_j``.
        """
        plan, system = self.round_plan(data.counts, key, up_bits)
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
