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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
from sflam_jax.data.batches import ClientData, client_batch, epoch_orders, local_steps
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

    @property
    def chunk(self) -> int:
        return self.chunk_size or self.clients_per_round

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

    def client_step(self, carry, data: ClientData, client, count, orders, up_bits, key, step):
        """One local step of one client and its server copy; a step with no samples is a no-op."""
        params_c, params_s, opt_c, opt_s, stats = carry
        images, labels, mask = client_batch(data, client, count, orders, step, self.batch_size)
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

    def train_chunk(self, state: RoundState, data: ClientData, clients, counts, up_bits, keys):
        """Local training of C clients from the global model; returns their stacked results.

        Args:
          state: the round's global model.
          data: the client table.
          clients: ``[C]`` client ids.
          counts: ``[C]`` samples of each (0 for padding slots).
          up_bits: ``[C]`` uplink bits.
          keys: ``[C]`` per-client keys.

        Returns:
          ``(params_c [C, ...], params_s [C, ...], stats [C, 3])`` with stats (summed loss,
          correct, samples seen).
        """
        width = data.index.shape[1]
        order_keys, step_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        orders = jax.vmap(lambda k, n: epoch_orders(k, n, width, self.local_epochs))(
            order_keys, counts
        )
        c = clients.shape[0]
        stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), tree)  # noqa: E731
        params_c, params_s = stack(state.params_c), stack(state.params_s)
        carry = (
            params_c,
            params_s,
            jax.vmap(self.optimizer.init)(params_c),
            jax.vmap(self.optimizer.init)(params_s),
            jnp.zeros((c, 3), jnp.float32),
        )
        step_fn = jax.vmap(self.client_step, in_axes=(0, None, 0, 0, 0, 0, 0, None))
        num_steps = jnp.max(local_steps(counts, self.batch_size, self.local_epochs))
        carry = jax.lax.fori_loop(
            0,
            num_steps,
            lambda t, carry: step_fn(carry, data, clients, counts, orders, up_bits, step_keys, t),
            carry,
        )
        return carry[0], carry[1], carry[4]

    # -- the round --------------------------------------------------------------------------

    def round_plan(self, data: ClientData, key: jax.Array, up_bits):
        """Which clients train this round and with which bits, padded to whole chunks.

        Returns ``({"clients", "counts", "up_bits", "keys"} each [num_chunks, C], system metrics)``;
        with a planner, the bits come from its allocation for the sampled clients.
        """
        sample_key, train_key = jax.random.split(key)
        s, total = self.clients_per_round, self.num_chunks * self.chunk
        clients = sample_clients(sample_key, data.num_clients, s)
        bits = jnp.broadcast_to(jnp.asarray(up_bits, jnp.float32), (s,))
        system = {}
        if self.planner is not None:
            counts = data.counts[clients]
            steps = local_steps(counts, self.batch_size, self.local_epochs)
            bits, system = self.planner(jax.random.fold_in(key, _SYSTEM_STREAM), steps, counts)
        pad = total - s
        clients = jnp.concatenate([clients, jnp.zeros((pad,), jnp.int32)])
        counts = jnp.where(jnp.arange(total) < s, data.counts[clients], 0)
        bits = jnp.concatenate([bits, jnp.full((pad,), quant.FLOAT_BITS, jnp.float32)])
        keys = jax.vmap(lambda c: jax.random.fold_in(train_key, c))(clients)
        shape = (self.num_chunks, self.chunk)
        plan = {
            "clients": clients.reshape(shape),
            "counts": counts.reshape(shape),
            "up_bits": bits.reshape(shape),
            "keys": keys.reshape(shape),
        }
        return plan, system

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
        plan, system = self.round_plan(data, key, up_bits)

        def chunk_body(acc, chunk):
            params_c, params_s, stats = self.train_chunk(
                state, data, chunk["clients"], chunk["counts"], chunk["up_bits"], chunk["keys"]
            )
            w = chunk["counts"].astype(jnp.float32)
            acc_c, acc_s, acc_stats = acc
            acc_c = jax.tree.map(jnp.add, acc_c, weighted_sum(params_c, w))
            acc_s = jax.tree.map(jnp.add, acc_s, weighted_sum(params_s, w))
            health = jnp.stack(
                [
                    jnp.isfinite(stats[:, 0]),
                    finite_per_client(params_c),
                    finite_per_client(params_s),
                ]
            )
            return (acc_c, acc_s, acc_stats + jnp.sum(stats, axis=0)), health

        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        init = (zeros(state.params_c), zeros(state.params_s), jnp.zeros((3,), jnp.float32))
        (sum_c, sum_s, stats), health = jax.lax.scan(chunk_body, init, plan)
        weight = jnp.sum(plan["counts"]).astype(jnp.float32)
        return self.finish_round(
            state,
            system,
            average_or_keep(sum_c, weight, state.params_c),
            average_or_keep(sum_s, weight, state.params_s),
            stats,
            plan["clients"].reshape(-1),
            # [3, S]: finite loss, client segment and server copy of each sampled client.
            jnp.moveaxis(health, 1, 0).reshape(3, -1),
        )

    def finish_round(self, state, system, params_c, params_s, stats, clients, health):
        """The new state and the round's metrics (shared by every protocol).

        Args:
          state: the state the round started from.
          system: the planner's metrics (empty without a planner).
          params_c, params_s: the new global segments.
          stats: ``[3]`` summed loss, correct predictions, samples.
          clients: ``[>= S]`` client ids in sampling order (padding after the first S).
          health: ``[3, >= S]`` finite flags in the same order.
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
