"""Splitting a training set over K clients: Dirichlet(alpha) non-IID or IID (SPEC section 1)."""

from __future__ import annotations

import numpy as np

from sflam_jax.errors import ConfigError


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_samples: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Non-IID partition: for each class, shares over clients drawn from Dirichlet(alpha * 1_K).

    Every sample goes to exactly one client. Draws are repeated (from the same seeded generator)
    until every client holds at least ``min_samples`` samples.

    Args:
      labels: ``[N]`` integer labels.
      num_clients: K.
      alpha: Dirichlet concentration; small is more skewed.
      seed: seed of the numpy generator.
      min_samples: smallest allowed client size.
      max_tries: draws before giving up.

    Returns:
      K sorted index arrays into ``labels``.

    Raises:
      ValueError: no draw within ``max_tries`` gives every client ``min_samples`` samples.
    """
    _check(labels, num_clients, min_samples)
    if alpha <= 0:
        raise ConfigError(f"data.alpha={alpha} must be > 0")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_samples:
            return result
    raise ConfigError(
        f"data.alpha={alpha}: no Dirichlet draw in {max_tries} tries gave all {num_clients} "
        f"clients at least data.min_client_samples={min_samples} samples; raise alpha or lower "
        "data.min_client_samples or data.num_clients"
    )


def iid_partition(
    labels: np.ndarray, num_clients: int, seed: int, min_samples: int = 1
) -> list[np.ndarray]:
    """IID partition: a random permutation cut into K near-equal parts."""
    _check(labels, num_clients, min_samples)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def _check(labels: np.ndarray, num_clients: int, min_samples: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"data.num_clients={num_clients} must be >= 1")
    if num_clients * min_samples > len(labels):
        raise ConfigError(
            f"data.num_clients={num_clients} clients with at least {min_samples} samples each need "
            f"{num_clients * min_samples} samples; the training set has {len(labels)}"
        )


def partition(labels: np.ndarray, data_cfg, seed: int) -> list[np.ndarray]:
    """The partition a ``config.data`` block asks for (``partition`` is "dirichlet" or "iid")."""
    if data_cfg.partition == "dirichlet":
        return dirichlet_partition(
            labels, data_cfg.num_clients, data_cfg.alpha, seed, data_cfg.min_client_samples
        )
    if data_cfg.partition == "iid":
        return iid_partition(labels, data_cfg.num_clients, seed, data_cfg.min_client_samples)
    raise ConfigError(
        f"data.partition={data_cfg.partition!r} is unknown; allowed: 'dirichlet', 'iid'"
    )
