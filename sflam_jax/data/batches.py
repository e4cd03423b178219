"""Per-client batches built inside the jitted round from a device-resident client table.

The training images stay on the device once; a round only gathers the indices its sampled clients
need. Clients own different numbers of samples, so each client's rows are padded to a common length
and every batch carries a mask: a partial last batch masks its tail, and a step past a client's
``tau_k`` is masked whole (the protocols skip its update).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ClientData:
    """Training data and its partition, all device arrays.

    Attributes:
      images: ``[N, H, W, C]`` uint8 training images.
      labels: ``[N]`` int32.
      index: ``[K, L]`` int32, client k's sample indices in its first ``counts[k]`` entries (the
        rest 0);
        ``L`` is the largest client size rounded up to a multiple of the batch size.
      counts: ``[K]`` int32 samples per client.
    """

    images: jax.Array
    labels: jax.Array
    index: jax.Array
    counts: jax.Array

    @property
    def num_clients(self) -> int:
        return self.index.shape[0]


def client_table(parts: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads per-client index arrays into ``(index [K, L], counts [K])``."""
    counts = np.asarray([len(p) for p in parts], np.int32)
    width = max(1, -(-int(counts.max()) // batch_size)) * batch_size
    index = np.zeros((len(parts), width), np.int32)
    for k, p in enumerate(parts):
        index[k, : len(p)] = p
    return index, counts


def make_client_data(images, labels, parts, batch_size: int) -> ClientData:
    index, counts = client_table(parts, batch_size)
    return ClientData(
        images=jnp.asarray(images),
        labels=jnp.asarray(labels, jnp.int32),
        index=jnp.asarray(index),
        counts=jnp.asarray(counts),
    )


def steps_per_epoch(count: jax.Array, batch_size: int) -> jax.Array:
    return (count + batch_size - 1) // batch_size


def local_steps(count: jax.Array, batch_size: int, epochs: int) -> jax.Array:
    """``tau_k``: E epochs of ``ceil(n_k / B)`` steps each (SPEC section 1)."""
    return epochs * steps_per_epoch(count, batch_size)


def epoch_orders(key: jax.Array, count: jax.Array, width: int, epochs: int) -> jax.Array:
    """Shuffled positions ``[E, width]``: a permutation of ``[0, count)`` per epoch, padding last.

    Args:
      key: PRNG key of this client and round.
      count: the client's number of samples (traced scalar).
      width: padded row length ``L``.
      epochs: E.
    """
    valid = jnp.arange(width) < count
    noise = jax.random.uniform(key, (epochs, width))
    return jnp.argsort(jnp.where(valid, noise, 2.0), axis=-1).astype(jnp.int32)


def client_batch(
    data: ClientData,
    client: jax.Array,
    count: jax.Array,
    orders: jax.Array,
    step: jax.Array,
    batch_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch ``step`` of one client's local training.

    Args:
      data: the client table.
      client: the client's id (traced scalar).
      count: the samples it trains on, ``data.counts[client]`` or 0 for a padding slot.
      orders: ``[E, L]`` from ``epoch_orders``.
      step: local step index in ``[0, tau_k)``; later steps give an all-false mask.
      batch_size: B.

    Returns:
      ``images [B, H, W, C]`` uint8, ``labels [B]`` int32, ``mask [B]`` bool.
    """
    spe = jnp.maximum(steps_per_epoch(count, batch_size), 1)
    epoch = jnp.minimum(step // spe, orders.shape[0] - 1)
    offset = (step % spe) * batch_size
    positions = jax.lax.dynamic_slice(orders[epoch], (offset,), (batch_size,))
    in_range = step < orders.shape[0] * steps_per_epoch(count, batch_size)
    mask = (offset + jnp.arange(batch_size) < count) & in_range
    rows = data.index[client, positions]
    return data.images[rows], data.labels[rows], mask


def preprocess(images: jax.Array, mean, std, image_size: int, channels: int = 0) -> jax.Array:
    """uint8 ``[B, H, W, C]`` -> normalised float32 ``[B, S, S, C']`` (bilinear resize if needed).

    ``mean`` and ``std`` are per-channel values (or scalars) on the ``[0, 1]`` scale. With
    ``channels=3`` a one-channel (grey) batch is repeated to three channels first; 0 keeps ``C``.
    """
    if channels and images.shape[-1] != channels:
        if images.shape[-1] != 1:
            raise ValueError(f"images have {images.shape[-1]} channels; the model takes {channels}")
        images = jnp.repeat(images, channels, axis=-1)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    if x.shape[1] != image_size or x.shape[2] != image_size:
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "bilinear")
    return x
