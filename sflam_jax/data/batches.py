"""Per-client batches built inside the jitted round from a client table.

Two places hold the training data. ``ClientData`` keeps every image on the device once and a round
gathers the rows of a chunk of sampled clients (``gather_rows``) inside the jitted round. For large
populations or several processes the host keeps the table instead (``HostClients``) and streams
each block of chunks to the devices (``HostClients.rows``), so device memory holds one block
however many clients there are, and a process holds only its own clients' samples.

Clients own different numbers of samples, so each client's rows are padded to a common length
``L`` and every batch carries a mask: a partial last batch masks its tail, and a step past a
client's ``tau_k`` is masked whole (the protocols skip its update).
"""

from __future__ import annotations

import dataclasses

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


@flax.struct.dataclass
class ClientRows:
    """The padded samples of a group of clients (or, sliced, of one client).

    Attributes:
      images: ``[..., L, H, W, C]`` uint8, client c's samples in its first ``counts[c]`` rows.
      labels: ``[..., L]`` int32.
    """

    images: jax.Array
    labels: jax.Array

    def take(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images and labels at ``positions`` of one client's rows."""
        return self.images[positions], self.labels[positions]


@flax.struct.dataclass
class IndexedRows:
    """One client's samples as indices into a sample table, gathered a batch at a time.

    Attributes:
      images: ``[N, H, W, C]`` uint8, the table (shared by every client that reads it).
      labels: ``[N]`` int32.
      index: ``[L]`` int32, the client's samples in its first ``count`` entries.
    """

    images: jax.Array
    labels: jax.Array
    index: jax.Array

    def take(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images and labels at ``positions`` of the client's index row."""
        rows = self.index[positions]
        return self.images[rows], self.labels[rows]


def gather_rows(data: ClientData, clients: jax.Array) -> ClientRows:
    """The rows of ``clients`` (``[C]`` ids) from the device table: ``[C, L, ...]``."""
    rows = data.index[clients]
    return ClientRows(images=data.images[rows], labels=data.labels[rows])


@dataclasses.dataclass
class HostClients:
    """The client table on the host, holding only the samples of the ``owned`` clients.

    Attributes:
      index: ``[K, L]`` dataset positions of every client's samples (as ``ClientData.index``).
      counts: ``[K]`` samples per client.
      owned: ``[K]`` bool, the clients whose samples this process holds.
      local: ``[N]`` int64, where dataset position i sits in ``images``/``labels`` (-1: not held).
      images: ``[N_held, H, W, C]`` uint8, the held samples only.
      labels: ``[N_held]`` int32.
    """

    index: np.ndarray
    counts: np.ndarray
    owned: np.ndarray
    local: np.ndarray
    images: np.ndarray
    labels: np.ndarray

    @classmethod
    def create(cls, images, labels, parts, batch_size: int, owned=None) -> HostClients:
        """Keeps the samples of the ``owned`` clients (default: all) of ``images``/``labels``."""
        index, counts = client_table(parts, batch_size)
        owned = np.ones(len(parts), bool) if owned is None else np.asarray(owned, bool)
        held = [np.asarray(parts[k], np.int64) for k in np.flatnonzero(owned)]
        keep = np.unique(np.concatenate(held)) if held else np.zeros(0, np.int64)
        local = np.full(len(labels), -1, np.int64)
        local[keep] = np.arange(len(keep))
        return cls(
            index=index,
            counts=counts,
            owned=owned,
            local=local,
            images=np.asarray(images)[keep],
            labels=np.asarray(labels, np.int32)[keep],
        )

    @property
    def num_clients(self) -> int:
        return self.index.shape[0]

    def rows(self, clients: np.ndarray, counts: np.ndarray) -> ClientRows:
        """Numpy rows ``[*clients.shape, L, ...]`` of held clients; slots with count 0 are zero.

        Raises:
          ValueError: a slot with samples names a client this process does not hold.
        """
        clients, counts = np.asarray(clients), np.asarray(counts)
        width = self.index.shape[1]
        valid = np.arange(width) < counts[..., None]
        where = self.local[self.index[clients]]
        missing = valid & (where < 0)
        if missing.any():
            k = int(clients[np.nonzero(missing.any(-1))][0])
            raise ValueError(f"client {k}'s samples are held by another process")
        # Empty slots read held sample 0 (or nothing) and are then zeroed.
        where = np.where(valid, where, 0)
        images = np.zeros((*where.shape, *self.images.shape[1:]), np.uint8)
        labels = np.zeros(where.shape, np.int32)
        if len(self.labels):
            images[valid] = self.images[where[valid]]
            labels[valid] = self.labels[where[valid]]
        return ClientRows(images=images, labels=labels)


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
    rows: ClientRows | IndexedRows,
    count: jax.Array,
    orders: jax.Array,
    step: jax.Array,
    batch_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch ``step`` of one client's local training.

    Args:
      rows: one client's padded samples (``[L, H, W, C]`` and ``[L]``), or their indices.
      count: the samples it trains on, or 0 for a padding slot.
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
    images, labels = rows.take(positions)
    return images, labels, mask


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
