"""The trainable parameter subset of sparse federated training (FTTE, SPEC section 6.4): its units,
its memory and FLOPs from XLA, and the two selection rules.

A subset is a ``frozenset`` of leaf paths (tuples of keys) of the whole ViT tree
(``models.split.merge_params``); ``take`` cuts a tree down to those leaves (a nested dict with
only them) and ``overlay`` writes such a sub-tree back. Units are the groups selection adds at
once, ordered from the output down (``units``): the head (classifier and final norm), then for each
block from the last to the first its biases and norms, then its kernels, then the embedding.
Training any unit needs the backward pass from the loss down to it and no further, so a prefix of
this order is also the memory order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sflam_jax.algorithms.base import masked_cross_entropy
from sflam_jax.errors import ConfigError

Path = tuple[str, ...]

# The values of ``ftte.selection``.
SELECTIONS = ("last_blocks", "greedy", "all")


def leaf_paths(tree: dict) -> list[Path]:
    """Every leaf's path (tuple of dict keys) in tree order."""
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def take(tree: dict, subset: frozenset) -> dict:
    """The nested dict of ``tree``'s leaves whose paths are in ``subset`` (no empty dicts)."""
    out: dict = {}
    for path, leaf in zip(leaf_paths(tree), jax.tree.leaves(tree), strict=True):
        if path in subset:
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = leaf
    return out


def overlay(tree: dict, sub: dict) -> dict:
    """``tree`` with the leaves of ``sub`` (from ``take``) in place of its own."""
    return {
        k: (overlay(v, sub[k]) if isinstance(v, dict) else sub[k]) if k in sub else v
        for k, v in tree.items()
    }


def size(tree) -> int:
    """Number of values in a tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def units(params: dict) -> list[tuple[str, frozenset]]:
    """``[(name, paths)]``: the selection units of a whole ViT tree, from the output down."""
    paths = leaf_paths(params)
    blocks = sorted(
        (k for k in params if k.startswith("block_")), key=lambda k: int(k.split("_")[1])
    )
    cheap = lambda p: p[-1] in ("bias", "scale")  # noqa: E731 (biases and norms)
    out = [("head", frozenset(p for p in paths if p[0] == "head"))]
    for name in reversed(blocks):
        mine = [p for p in paths if p[0] == name]
        out.append((f"{name}.biases_norms", frozenset(p for p in mine if cheap(p))))
        out.append((f"{name}.kernels", frozenset(p for p in mine if not cheap(p))))
    out.append(("embedding", frozenset(p for p in paths if p[0] == "embedding")))
    covered = frozenset().union(*(u for _, u in out))
    if covered != frozenset(paths):
        missing = sorted(set(paths) - covered)
        raise ValueError(f"parameters outside every selection unit: {missing[:3]}")
    return [(n, u) for n, u in out if u]


@dataclasses.dataclass(frozen=True)
class SubsetCost:
    """What training a subset costs one device for one batch (from XLA's analyses).

    Attributes:
      memory_bytes: peak training memory of one local step: arguments (the whole model, the
        batch, the optimizer state of the subset) + outputs not aliased to them + temporaries.
      flops_per_sample: forward and backward FLOPs of one step divided by the batch size.
      params: values in the subset (what a client downloads after the first time and uploads).
    """

    memory_bytes: float
    flops_per_sample: float
    params: int


@dataclasses.dataclass(frozen=True)
class SubsetTraining:
    """One device's training of a subset: the loss and the optimizer step.

    Attributes:
      logits: ``(whole params, images, key) -> [B, classes]``.
      preprocess: uint8 images -> model inputs.
      optimizer: the local optimizer (state only for the subset).
    """

    logits: Callable
    preprocess: Callable
    optimizer: optax.GradientTransformation

    def loss(self, train: dict, frozen: dict, images, labels, mask, key):
        """Masked mean loss of a batch; differentiated only in ``train`` (the subset), so no
        backward pass is formed below the subset's lowest unit."""
        logits = self.logits(overlay(frozen, train), self.preprocess(images), key)
        loss, total, correct = masked_cross_entropy(logits, labels, mask)
        return loss, (total, correct)

    def step(self, train: dict, opt_state, frozen: dict, images, labels, mask, key):
        """One optimizer step on the subset: ``(train, opt_state, grads, (loss sum, correct))``."""
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (_, aux), grads = grad_fn(train, frozen, images, labels, mask, key)
        updates, opt_state = self.optimizer.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, grads, aux

    def cost(self, params: dict, subset: frozenset, batch_shape) -> SubsetCost:
        """XLA's memory and cost analysis of one step on a batch of ``batch_shape`` (uint8
        images, ``[B, H, W, C]``), compiled for the default device."""
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        return _cost(self, shapes, subset, tuple(batch_shape))


@functools.lru_cache(maxsize=256)
def _cost_cached(training, treedef, leaves, subset, batch_shape):
    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    train = take(params, subset)
    opt_state = jax.eval_shape(training.optimizer.init, train)
    b = batch_shape[0]
    args = (
        train,
        opt_state,
        params,
        jax.ShapeDtypeStruct(batch_shape, jnp.uint8),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.bool_),
        jax.eval_shape(lambda: jax.random.key(0)),
    )

    def one_step(train, opt_state, params, images, labels, mask, key):
        new, opt_state, _, aux = training.step(train, opt_state, params, images, labels, mask, key)
        return new, opt_state, aux

    compiled = jax.jit(one_step, donate_argnums=(0, 1)).lower(*args).compile()
    mem = compiled.memory_analysis()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return SubsetCost(float(peak), float(analysis["flops"]) / b, size(train))


def _cost(training, shapes, subset, batch_shape) -> SubsetCost:
    leaves, treedef = jax.tree.flatten(shapes)
    key = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)
    return _cost_cached(training, treedef, key, subset, batch_shape)


def no_subset_fits(field: str, budget: float, smallest: float, name: str) -> ConfigError:
    return ConfigError(
        f"{field}={budget!r} is invalid: no trainable subset fits; the smallest ({name}) needs "
        f"{smallest:.0f} bytes of device training memory"
    )


def select_last_blocks(
    training: SubsetTraining, params: dict, batch_shape, budget: float, field: str
) -> frozenset:
    """The longest prefix of ``units`` (head, then blocks from the last down, biases and norms
    before kernels, then the embedding) whose training fits ``budget`` bytes.

    Raises:
      ConfigError: not even the head fits (``field`` named).
    """
    order = units(params)
    prefixes = [frozenset().union(*(u for _, u in order[: i + 1])) for i in range(len(order))]
    # The memory grows with the prefix: bisect for the longest one that fits.
    lo, hi = 0, len(prefixes)
    while lo < hi:
        mid = (lo + hi) // 2
        if training.cost(params, prefixes[mid], batch_shape).memory_bytes <= budget:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        smallest = training.cost(params, prefixes[0], batch_shape).memory_bytes
        raise no_subset_fits(field, budget, smallest, order[0][0])
    return prefixes[lo - 1]


def proxy_gains(
    training: SubsetTraining,
    params: dict,
    candidates: list[frozenset],
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    batch_size: int,
) -> np.ndarray:
    """Loss decrease on a proxy split after ``steps`` optimizer steps on each candidate subset
    from ``params`` (full-batch cycles over the proxy samples), one vmapped program for all
    candidates (updates masked to the candidate). Returns ``[len(candidates)]``."""
    paths = leaf_paths(params)
    masks = jnp.asarray([[p in c for p in paths] for c in candidates], jnp.float32)
    n = len(labels)
    batches = -(-n // batch_size)
    pad = batches * batch_size - n
    x = jnp.concatenate([jnp.asarray(images), jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    y = jnp.concatenate([jnp.asarray(labels), jnp.zeros((pad,), labels.dtype)])
    valid = jnp.arange(batches * batch_size) < n
    x = x.reshape(batches, batch_size, *x.shape[1:])
    y, valid = y.reshape(batches, batch_size), valid.reshape(batches, batch_size)
    key = jax.random.key(0)

    def proxy_loss(p):
        def one(batch):
            xb, yb, mb = batch
            logits = training.logits(p, training.preprocess(xb), key)
            return masked_cross_entropy(logits, yb, mb)[1]

        return jnp.sum(jax.lax.map(one, (x, y, valid))) / n

    def after(mask):
        leaves, treedef = jax.tree.flatten(params)

        def step(t, carry):
            p, opt = carry
            b = t % batches
            grads = jax.grad(lambda q: training.loss(q, q, x[b], y[b], valid[b], key)[0])(p)
            grads = jax.tree.unflatten(
                treedef, [g * m for g, m in zip(jax.tree.leaves(grads), mask, strict=True)]
            )
            updates, opt = training.optimizer.update(grads, opt, p)
            return optax.apply_updates(p, updates), opt

        p = jax.tree.unflatten(treedef, leaves)
        p, _ = jax.lax.fori_loop(0, steps, step, (p, training.optimizer.init(p)))
        return proxy_loss(p)

    start = proxy_loss(params)
    return np.asarray(start - jax.jit(jax.vmap(after))(masks))


def select_greedy(
    training: SubsetTraining,
    params: dict,
    batch_shape,
    budget: float,
    field: str,
    proxy: tuple[np.ndarray, np.ndarray],
    steps: int,
) -> frozenset:
    """Greedy by measured loss gain per byte: the head first (every subset trains it), then the
    other units in descending ``gain(head + unit) - gain(head)`` per byte of memory they add (gains
    measured on the ``proxy`` images and labels by ``proxy_gains``), each added when the subset
    with it still fits ``budget``.

    Raises:
      ConfigError: not even the head fits.
    """
    order = units(params)
    head = order[0][1]
    base = training.cost(params, head, batch_shape).memory_bytes
    if base > budget:
        raise no_subset_fits(field, budget, base, order[0][0])
    rest = [u for _, u in order[1:]]
    gains = proxy_gains(
        training, params, [head, *(head | u for u in rest)], *proxy, steps, batch_shape[0]
    )
    extra = [
        max(training.cost(params, head | u, batch_shape).memory_bytes - base, 1.0) for u in rest
    ]
    ranked = sorted(range(len(rest)), key=lambda i: -(gains[i + 1] - gains[0]) / extra[i])
    chosen = head
    for i in ranked:
        if gains[i + 1] <= gains[0]:
            continue
        if training.cost(params, chosen | rest[i], batch_shape).memory_bytes <= budget:
            chosen = chosen | rest[i]
    return chosen
