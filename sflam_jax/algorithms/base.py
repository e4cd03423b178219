"""State types and pieces shared by the protocols: sampling, FedAvg, the loss, evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sflam_jax.data.batches import ClientData
from sflam_jax.errors import NonFiniteError
from sflam_jax.models.split import SplitModel


@flax.struct.dataclass
class RoundState:
    """Everything a run carries from one round to the next (checkpointed whole).

    Attributes:
      round: int32 scalar, rounds completed; the next round's key is ``fold_in(seed_key, round)``.
      params_c: global client segment ``w_c``.
      params_s: global server segment ``w_s``.
      sim_time_s: simulated wall-clock so far, the sum of the rounds' T_round (SPEC section 3).
      sim_energy_j: device energy so far, the sum of the rounds' E_round.
    """

    round: jax.Array
    params_c: dict
    params_s: dict
    sim_time_s: jax.Array
    sim_energy_j: jax.Array

    @classmethod
    def create(cls, params_c: dict, params_s: dict) -> RoundState:
        """The state before the first round."""
        # Separate buffers: the jitted round donates the state, and a buffer may be donated once.
        zero = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
        return cls(jnp.zeros((), jnp.int32), params_c, params_s, zero(), zero())


class Algorithm(Protocol):
    """A training protocol: one jit-able round over a sample of clients."""

    def round(
        self, state: RoundState, data: ClientData, key: jax.Array
    ) -> tuple[RoundState, dict[str, jax.Array]]: ...


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """uint8 images -> model inputs (normalisation and resize, see data.batches.preprocess)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int = 0  # model input channels; grey images are repeated to 3. 0: as the data

    def __call__(self, images: jax.Array) -> jax.Array:
        from sflam_jax.data.batches import preprocess

        return preprocess(images, self.mean, self.std, self.image_size, self.channels)


def sample_clients(key: jax.Array, num_clients: int, per_round: int) -> jax.Array:
    """S of K client ids, uniformly without replacement (SPEC section 1). Returns ``[S]`` int32."""
    return jax.random.choice(key, num_clients, (per_round,), replace=False).astype(jnp.int32)


def make_optimizer(opt_cfg, learning_rate=None) -> optax.GradientTransformation:
    """The local optimizer of devices and server copies from ``config.optimizer``;
    ``learning_rate`` (a float or a traced scalar, for vectorized sweeps) replaces the config's."""
    name = opt_cfg.name
    lr = opt_cfg.learning_rate if learning_rate is None else learning_rate
    if name == "sgd":
        tx = optax.sgd(lr, momentum=opt_cfg.momentum or None)
    elif name == "adam":
        tx = optax.adam(lr)
    elif name == "adamw":
        return optax.adamw(lr, weight_decay=opt_cfg.weight_decay)
    else:
        raise ValueError(f"optimizer.name={name!r} is unknown; allowed: 'sgd', 'adam', 'adamw'")
    if opt_cfg.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), tx)
    return tx


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax cross-entropy over the valid samples of a batch.

    Args:
      logits: ``[B, classes]``.
      labels: ``[B]`` int.
      mask: ``[B]`` bool, True for real samples.

    Returns:
      ``(mean loss over valid samples (0 if none), summed loss, number of correct predictions)``.
    """
    m = mask.astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total = jnp.sum(ce * m)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * m)
    return total / jnp.maximum(jnp.sum(m), 1.0), total, correct


# Metrics key of the per-client finite flags a round returns for the trainer's guard.
HEALTH = "health"
_HEALTH_PARTS = ("loss", "client segment", "server copy")


def finite_per_client(trees) -> jax.Array:
    """``[C]`` bool: whether every value of client c's slice of the stacked ``trees`` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(trees)
    ]
    return jnp.all(jnp.stack(leaves), axis=0)


def check_health(health, clients, round_index: int) -> None:
    """Raises ``NonFiniteError`` naming the round and the first client with a non-finite value.

    Args:
      health: ``[3, S]`` bool from a round's metrics: finite loss, finite client segment (or whole
        model for FL), finite server copy (the shared server segment for SFL-V2 and SL).
      clients: ``[S]`` the sampled client ids.
      round_index: the round's number (1-based, as in metrics.jsonl).
    """
    health, clients = np.asarray(health, bool), np.asarray(clients)
    bad = np.flatnonzero(~health.all(axis=0))
    if not len(bad):
        return
    first = bad[0]
    parts = [name for name, ok in zip(_HEALTH_PARTS, health[:, first], strict=True) if not ok]
    if parts == ["server copy"]:
        where = f"the server (its segment for client {int(clients[first])})"
    else:
        where = f"client {int(clients[first])}"
    others = ", ".join(str(int(c)) for c in clients[bad[1:]])
    raise NonFiniteError(
        f"round {round_index}: {where} produced a non-finite {' and '.join(parts)}"
        + (f" (also clients {others})" if others else "")
        + "; the round was not saved. Lower optimizer.learning_rate or raise the quantization "
        "bits, then resume from the last good checkpoint."
    )


def average_or_keep(totals, weight: jax.Array, old):
    """``totals / weight`` leaf by leaf, or ``old`` when the weight is 0 (a round whose sampled
    clients hold no samples leaves the global model as it was)."""
    return jax.tree.map(lambda t, o: jnp.where(weight > 0, t / weight, o), totals, old)


def weighted_sum(trees, weights: jax.Array):
    """``sum_k weights[k] * tree_k`` over the leading axis of stacked trees."""
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), trees)


def make_evaluate(
    model: SplitModel, preprocess: Callable, batch_size: int
) -> Callable[[dict, dict, jax.Array, jax.Array], dict[str, jax.Array]]:
    """Returns ``evaluate(params_c, params_s, images, labels) -> {"test_loss", "test_accuracy"}``.

    The global model is evaluated unsplit in effect: ``server(client(x))`` with float cut-layer
    traffic. Call it under ``jax.jit``; the test set is padded to whole batches and masked.
    """

    def evaluate(params_c, params_s, images, labels):
        n = images.shape[0]
        pad = (-n) % batch_size
        images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        mask = jnp.arange(n + pad) < n
        batches = (
            images.reshape(-1, batch_size, *images.shape[1:]),
            labels.reshape(-1, batch_size),
            mask.reshape(-1, batch_size),
        )

        def one(batch):
            x, y, m = batch
            # AQT modules draw their (backward-only) rounding noise from a key even in a forward
            # pass; a fixed one keeps evaluation deterministic.
            key = jax.random.key(0)
            smashed = model.client_apply(params_c, preprocess(x), key)
            logits = model.server_apply(params_s, smashed, key)
            _, loss, correct = masked_cross_entropy(logits, y, m)
            return loss, correct

        losses, correct = jax.lax.map(one, batches)
        return {"test_loss": jnp.sum(losses) / n, "test_accuracy": jnp.sum(correct) / n}

    return evaluate
