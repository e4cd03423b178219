"""FTTE and FedBuff: semi-asynchronous (sparse) federated training on the event clock (SPEC 6.4).

Not split learning: every device trains the whole ViT's trainable subset ``w*`` (FL), and the
server runs an event loop instead of rounds (``sflam_jax.events``): it keeps ``ftte.concurrency``
clients busy; each arrival (at the time the system model gives its trip: download, local
training, upload, times the straggler slow-down) enters a buffer, and when ``ftte.buffer_size``
deltas are in the server applies their weighted mean and dispatches new clients from the new
version. The trainer's "rounds" are these server versions.

- ``ftte``: ``w*`` chosen once before training to fit ``ftte.memory_budget_bytes`` (or the
  weakest device's memory), by ``ftte.selection`` (``algorithms.sparse``); buffer weights
  ``a_i = n_i s(tau_i) u(sigma_i^2)`` with the staleness weight ``s(tau) = (1 + tau)^(-e)``
  (``ftte.staleness = "polynomial"``, ``e = ftte.staleness_exponent``; ``"none"``: 1) and the
  variance weight ``u = 1 / (1 + sigma_i^2 / mean_buffer(sigma^2))`` (``ftte.variance_weight``).
- ``fedbuff``: the same buffer on all parameters with the staleness weight only (it reads the
  ``ftte`` block; ``selection``, ``memory_*`` and ``variance_weight`` do not apply).

With ``buffer_size = concurrency``, no stragglers, all parameters and ``s = u = 1`` a version is
one FedAvg round over the clients dispatched at it (tested against the synchronous engine).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sflam_jax import events, fields, streams
from sflam_jax.algorithms import sparse
from sflam_jax.algorithms.base import (
    Costs,
    EngineInputs,
    Protocol,
    batch_stats,
    keep_if,
    make_optimizer,
)
from sflam_jax.data.batches import ClientRows, client_batch, epoch_orders, local_steps
from sflam_jax.wireless.channel import SystemParams

# The values of ``ftte.staleness``.
STALENESS = ("polynomial", "none")


def config_block() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.concurrency = 20  # C: clients training at once
    c.buffer_size = 10  # K: arrivals per server update (<= concurrency)
    c.staleness = "polynomial"  # s(tau) = (1 + tau)^(-staleness_exponent); "none": s = 1
    c.staleness_exponent = 0.5
    c.variance_weight = True  # u = 1 / (1 + sigma_i^2 / buffer mean); FTTE only
    c.server_lr = 1.0  # eta_g
    # Trainable subset (FTTE only): "last_blocks" (head, then blocks from the last down, as many
    # as fit), "greedy" (by loss gain per byte on a proxy split) or "all".
    c.selection = "last_blocks"
    # Device training memory budget of w*; 0 = the weakest device's memory, each device's drawn
    # once ~ U[device_memory_min_bytes, device_memory_max_bytes] from the seed.
    c.memory_budget_bytes = 0.0
    c.device_memory_min_bytes = 4.5 * 2**20
    c.device_memory_max_bytes = 16.0 * 2**20
    c.proxy_samples = 256  # greedy: training samples of the server's proxy split
    c.proxy_steps = 8  # greedy: optimizer steps per candidate on the proxy split
    c.straggler_fraction = 0.0  # share of the devices that are slow
    c.straggler_slowdown = 5.0  # their trips take this many times longer
    c.stop_sim_seconds = 0.0  # stop once the simulated clock passes this; 0 = num_rounds versions
    return c


def validate(cfg) -> None:
    c = fields.integer(cfg, "ftte.concurrency", 1)
    if c > cfg.data.num_clients:
        fields.fail(
            "ftte.concurrency",
            c,
            f"must be <= data.num_clients={cfg.data.num_clients} (each busy client is a "
            "different device)",
        )
    k = fields.integer(cfg, "ftte.buffer_size", 1)
    if k > c:
        fields.fail(
            "ftte.buffer_size",
            k,
            f"must be <= ftte.concurrency={c} (the server waits for K arrivals with C clients "
            "busy)",
        )
    fields.choice(cfg, "ftte.staleness", STALENESS)
    fields.number(cfg, "ftte.staleness_exponent", 0.0)
    fields.boolean(cfg, "ftte.variance_weight")
    fields.positive(cfg, "ftte.server_lr")
    fields.choice(cfg, "ftte.selection", sparse.SELECTIONS)
    fields.number(cfg, "ftte.memory_budget_bytes", 0.0)
    low = fields.positive(cfg, "ftte.device_memory_min_bytes")
    high = fields.positive(cfg, "ftte.device_memory_max_bytes")
    if low > high:
        fields.fail(
            "ftte.device_memory_min_bytes", low, f"must be <= ftte.device_memory_max_bytes={high!r}"
        )
    fields.integer(cfg, "ftte.proxy_samples", 1)
    fields.integer(cfg, "ftte.proxy_steps", 1)
    fields.number(cfg, "ftte.straggler_fraction", 0.0, 1.0)
    fields.number(cfg, "ftte.straggler_slowdown", 1.0)
    fields.number(cfg, "ftte.stop_sim_seconds", 0.0)


@dataclasses.dataclass(frozen=True)
class SparseClients:
    """Local training of the subset ``w*`` on whole-model devices (one client's code, vmapped).

    Attributes:
      training: the loss and optimizer step on a subset (``sparse.SubsetTraining``).
      subset: the leaf paths of ``w*`` in the whole ViT tree.
      local_epochs: E.
      batch_size: B.
    """

    training: sparse.SubsetTraining
    subset: frozenset
    local_epochs: int
    batch_size: int

    def train_client(self, params: dict, rows: ClientRows, count, key, num_steps):
        """One client's E local epochs on ``w*`` from the whole model ``params``.

        The key splits as ``SplitTraining.client_start``'s (epoch shuffles, step noise), so a
        client trains on the same batches as under the synchronous protocols. Steps past the
        client's ``tau_k`` (up to ``num_steps``, the padded batch's longest) are no-ops.

        Returns:
          ``(delta, stats [3], sigma2)``: the change of ``w*`` (a ``sparse.take`` tree), summed
          loss / correct predictions / samples, and the mean squared deviation of its step
          gradients from their mean (summed over ``w*``; 0 with fewer than two steps).
        """
        start = sparse.take(params, self.subset)
        frozen = params
        order_key, step_key = jax.random.split(key)
        orders = epoch_orders(order_key, count, rows.labels.shape[0], self.local_epochs)

        def step(t, carry):
            train, opt, stats, g_sum, g_sq, n = carry
            images, labels, mask = client_batch(rows, count, orders, t, self.batch_size)
            new, new_opt, grads, (total, correct) = self.training.step(
                train, opt, frozen, images, labels, mask, jax.random.fold_in(step_key, t)
            )
            active = jnp.any(mask)
            w = active.astype(jnp.float32)
            g_sum = jax.tree.map(lambda s, g: s + w * g, g_sum, grads)
            sq = sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))
            train, opt = keep_if(active, (new, new_opt), (train, opt))
            return (
                train,
                opt,
                stats + batch_stats(total, correct, mask),
                g_sum,
                g_sq + w * sq,
                n + w,
            )

        zeros = jax.tree.map(jnp.zeros_like, start)
        carry = (
            start,
            self.training.optimizer.init(start),
            jnp.zeros((3,), jnp.float32),
            zeros,
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
        )
        train, _, stats, g_sum, g_sq, n = jax.lax.fori_loop(0, num_steps, step, carry)
        mean_sq = sum(jnp.sum(g * g) for g in jax.tree.leaves(g_sum)) / jnp.maximum(n, 1.0) ** 2
        sigma2 = jnp.where(n > 1, jnp.maximum(g_sq / jnp.maximum(n, 1.0) - mean_sq, 0.0), 0.0)
        delta = jax.tree.map(jnp.subtract, train, start)
        return delta, stats, sigma2

    def train_batch(self, params: dict, rows: ClientRows, counts, keys):
        """``train_client`` for C clients side by side from the same global model, padded to the
        longest ``tau_k`` (a slot with count 0 trains nothing).

        Args:
          params: the whole global model.
          rows: ``[C, L, ...]``.
          counts: ``[C]``.
          keys: ``[C]``.

        Returns:
          ``(delta [C, ...], stats [C, 3], sigma2 [C])``.
        """
        num_steps = jnp.max(local_steps(counts, self.batch_size, self.local_epochs))
        return jax.vmap(self.train_client, in_axes=(None, 0, 0, 0, None))(
            params, rows, counts, keys, num_steps
        )


@dataclasses.dataclass(frozen=True)
class BufferRule:
    """How the server weighs a buffer of arrivals (SPEC 6.4).

    Attributes:
      staleness_exponent: e in ``s(tau) = (1 + tau)^(-e)``; 0: no staleness weight.
      variance_weight: use ``u = 1 / (1 + sigma_i^2 / mean_buffer(sigma^2))``.
      server_lr: eta_g.
    """

    staleness_exponent: float
    variance_weight: bool
    server_lr: float = 1.0

    def weights(self, counts, staleness, sigma2):
        """``a_i = n_i s(tau_i) u(sigma_i^2)`` of a buffer's ``[K]`` arrivals."""
        s = (1.0 + staleness.astype(jnp.float32)) ** (-self.staleness_exponent)
        a = counts.astype(jnp.float32) * s
        if self.variance_weight:
            mean = jnp.mean(sigma2)
            ratio = jnp.where(mean > 0, sigma2 / jnp.where(mean > 0, mean, 1.0), 0.0)
            a = a / (1.0 + ratio)
        return a


def rule(cfg, sparse_variant: bool) -> BufferRule:
    f = cfg.ftte
    return BufferRule(
        staleness_exponent=float(f.staleness_exponent) if f.staleness == "polynomial" else 0.0,
        variance_weight=bool(f.variance_weight) and sparse_variant,
        server_lr=float(f.server_lr),
    )


def select_subset(
    config, training: sparse.SubsetTraining, params: dict, dataset, run_key, sparse_variant: bool
):
    """``w*`` (``ftte.selection`` under the memory budget; every parameter for FedBuff,
    ``sparse_variant = False``, or ``selection = "all"``) and the budget it was chosen for (bytes;
    None: no selection)."""
    f = config.ftte
    everything = frozenset(sparse.leaf_paths(params))
    if not sparse_variant or f.selection == "all":
        return everything, None
    field = "ftte.memory_budget_bytes"
    budget = float(f.memory_budget_bytes)
    if not budget:
        field = "ftte.device_memory_min_bytes"
        budget = float(
            events.device_memories(
                run_key,
                config.data.num_clients,
                f.device_memory_min_bytes,
                f.device_memory_max_bytes,
            ).min()
        )
    batch = (config.train.batch_size, *dataset.image_shape)
    if f.selection == "last_blocks":
        return sparse.select_last_blocks(training, params, batch, budget, field), budget
    n = min(f.proxy_samples, len(dataset.train_labels))
    proxy = (dataset.train_images[:n], dataset.train_labels[:n].astype(np.int32))
    chosen = sparse.select_greedy(training, params, batch, budget, field, proxy, f.proxy_steps)
    return chosen, budget


def build_engine(config, inputs: EngineInputs, sparse_variant: bool):
    """``Protocol.engine`` of FTTE (``sparse_variant``) and FedBuff: the event loop
    (``sflam_jax.events``) with its trainable subset, buffer rule, trip costs and stragglers, the
    state before the first version, and the numbers ``system.json`` reports (device training
    memory and bytes per update of ``w*`` against the whole model)."""
    params, dataset = inputs.params, inputs.dataset
    training = sparse.SubsetTraining(
        logits=inputs.model.whole_logits,
        preprocess=inputs.preprocess,
        optimizer=make_optimizer(config.optimizer),
    )
    key = streams.run_key(config.seed)
    subset, budget = select_subset(config, training, params, dataset, key, sparse_variant)
    batch = (config.train.batch_size, *dataset.image_shape)
    cost = training.cost(params, subset, batch)
    full = training.cost(params, frozenset(sparse.leaf_paths(params)), batch)
    f = config.ftte
    engine = events.EventEngine(
        clients=SparseClients(
            training=training,
            subset=subset,
            local_epochs=config.train.local_epochs,
            batch_size=config.train.batch_size,
        ),
        rule=rule(config, sparse_variant),
        concurrency=f.concurrency,
        buffer_size=f.buffer_size,
        num_clients=config.data.num_clients,
        cut_layer=config.model.cut_layer,
        depth=inputs.model_cfg.depth,
        system=SystemParams.from_config(config.wireless),
        cost=cost,
        total_params=sparse.size(params),
        slowdown=events.straggler_slowdowns(
            key, config.data.num_clients, f.straggler_fraction, f.straggler_slowdown
        ),
        health_advice="Lower optimizer.learning_rate or ftte.server_lr",
        stop_sim_seconds=float(f.stop_sim_seconds),
    )
    params_c, params_s = inputs.model.segments(params)
    initial = events.AsyncState.create(
        params_c, params_s, subset, engine.concurrency, config.data.num_clients
    )
    names = [name for name, unit in sparse.units(params) if unit <= subset]
    system = {
        "trainable_units": names,
        "trainable_params": cost.params,
        "total_params": engine.total_params,
        "memory_budget_bytes": budget,
        "device_memory_bytes": cost.memory_bytes,
        "full_device_memory_bytes": full.memory_bytes,
        "flops_per_sample": cost.flops_per_sample,
        "full_flops_per_sample": full.flops_per_sample,
        "update_bytes": 4.0 * cost.params,
        "full_update_bytes": 4.0 * engine.total_params,
        "stragglers": int((engine.slowdown > 1).sum()),
    }
    return engine, initial, system


def _protocol(name: str, sparse_variant: bool, **block) -> Protocol:
    return Protocol(
        name=name,
        make=SparseClients,
        costs=Costs(),
        quantized_cut=False,
        aqt=False,
        allocators=("equal",),
        engine=functools.partial(build_engine, sparse_variant=sparse_variant),
        run_control=("ftte.stop_sim_seconds",),
        **block,
    )


PROTOCOL = _protocol("ftte", True, config_block=config_block, validate=validate)
FEDBUFF = _protocol("fedbuff", False, validate=validate)
