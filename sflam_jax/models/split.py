"""Cuts a ViT into a client segment and a server segment (SPEC section 1).

Client: embedding and blocks ``[0, cut_layer)``. Server: blocks ``[cut_layer, depth)``, final norm,
head. Both are returned as pure functions of a parameter pytree so that the protocols can ``vmap``
and differentiate them without seeing Flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sflam_jax.models import lora
from sflam_jax.models.vit import Block, Embedding, Head, ViTConfig, block_names


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """The two segments of a cut ViT.

    Attributes:
      client_apply: ``(params_c, images [B, H, W, C], key) -> smashed data [B, T, D]``.
      server_apply: ``(params_s, smashed [B, T, D], key) -> logits [B, classes]``.
      cut_layer: number of encoder blocks on the device.
      smashed_shape: ``(T, D)`` of one sample at the cut; Gamma is their product.
    """

    client_apply: Callable[..., jax.Array]
    server_apply: Callable[..., jax.Array]
    cut_layer: int
    smashed_shape: tuple[int, int]

    @property
    def values_per_sample(self) -> int:
        return self.smashed_shape[0] * self.smashed_shape[1]

    def segments(self, params: dict, key=None) -> tuple[dict, dict]:
        """``(params_c, params_s)`` of a whole ViT tree (``split_params`` at this cut)."""
        del key
        depth = sum(name.startswith("block_") for name in params)
        return split_params(params, self.cut_layer, depth)

    def logits(self, params_c: dict, params_s: dict, images: jax.Array, key=None) -> jax.Array:
        """The global model's logits, ``server(client(x))`` without the cut-layer link."""
        return self.server_apply(params_s, self.client_apply(params_c, images, key), key)

    def whole_logits(self, params: dict, images: jax.Array, key=None) -> jax.Array:
        """``logits`` of a whole ViT tree (``merge_params`` of the two segments)."""
        return self.logits(*self.segments(params), images, key)


@dataclasses.dataclass(frozen=True)
class VariableCut:
    """A ViT whose cut differs from client to client (ESFL): the whole model runs as one forward,
    the cut-layer ``link`` is applied at the client's own block boundary and the blocks before it
    use the device's matmuls, so clients with different cuts share one compiled program.

    The global model is kept split at ``cut_layer`` (checkpoints, evaluation and the comparison
    protocols see the usual segments).

    Attributes:
      cfg: the architecture.
      cut_layer: where the global parameters are split.
      client_dot_general_cls, server_dot_general_cls: matmul injections of the device's and the
        server's blocks (None: float); the embedding is the device's, the head the server's.
    """

    cfg: ViTConfig
    cut_layer: int
    client_dot_general_cls: Callable | None = None
    server_dot_general_cls: Callable | None = None

    def segments(self, params: dict, key=None) -> tuple[dict, dict]:
        del key
        return split_params(params, self.cut_layer, self.cfg.depth)

    def apply(self, params: dict, images: jax.Array, cut, link: Callable, key=None) -> jax.Array:
        """Logits of the whole model (``params``: the full tree) with the device holding the
        embedding and blocks ``[0, cut)``; ``link(x)`` is what the server receives at the cut
        (the identity for the model itself). ``cut`` may be traced (``[0, depth]``)."""
        cfg = self.cfg
        keys = _segment_keys(key, cfg.depth + 2)
        client_dg, server_dg = self.client_dot_general_cls, self.server_dot_general_cls
        embed = Embedding(cfg, client_dg)
        device_block, server_block = Block(cfg, client_dg), Block(cfg, server_dg)
        x = embed.apply({"params": params["embedding"]}, images, rngs=_rngs(keys[0]))
        for i, name in enumerate(block_names(cfg.depth)):
            x = jnp.where(cut == i, link(x), x)
            variables, rngs = {"params": params[name]}, _rngs(keys[i + 1])
            if client_dg is server_dg:
                x = device_block.apply(variables, x, rngs=rngs)
            else:  # both matmul kinds, the client's own kept
                on_device = device_block.apply(variables, x, rngs=rngs)
                x = jnp.where(i < cut, on_device, server_block.apply(variables, x, rngs=rngs))
        x = jnp.where(cut == cfg.depth, link(x), x)
        head = Head(cfg, server_dg)
        return head.apply({"params": params["head"]}, x, rngs=_rngs(keys[-1]))

    def logits(self, params_c: dict, params_s: dict, images: jax.Array, key=None) -> jax.Array:
        """The global model's logits at ``cut_layer``, without the link."""
        return self.apply(merge_params(params_c, params_s), images, self.cut_layer, _same, key)


def _same(x):
    return x


def client_keys(cut_layer: int) -> list[str]:
    return ["embedding", *block_names(cut_layer)]


def server_keys(cut_layer: int, depth: int) -> list[str]:
    return [*block_names(depth)[cut_layer:], "head"]


def split_params(params: dict, cut_layer: int, depth: int) -> tuple[dict, dict]:
    """Partitions the full ViT parameter tree into ``(params_c, params_s)``."""
    expected = set(client_keys(cut_layer)) | set(server_keys(cut_layer, depth))
    if set(params) != expected:
        raise ValueError(
            f"parameter tree has entries {sorted(params)}, expected {sorted(expected)} "
            f"for depth={depth}"
        )
    return (
        {k: params[k] for k in client_keys(cut_layer)},
        {k: params[k] for k in server_keys(cut_layer, depth)},
    )


def merge_params(params_c: dict, params_s: dict) -> dict:
    """Inverse of ``split_params``: the full tree of the global model."""
    return {**params_c, **params_s}


def _rngs(key: jax.Array | None) -> dict:
    # AQT's stochastic rounding draws from the "params" stream at apply time.
    return {} if key is None else {"params": key}


def split(
    cfg: ViTConfig,
    cut_layer: int,
    client_dot_general_cls: Callable | None = None,
    server_dot_general_cls: Callable | None = None,
) -> SplitModel:
    """Builds the pure apply functions of both segments for ``cut_layer`` in ``[0, depth]``.

    Args:
      cfg: the architecture.
      cut_layer: blocks kept on the device; 0 leaves only the embedding there.
      client_dot_general_cls: matmul injection of the client segment (None: float).
      server_dot_general_cls: matmul injection of the server segment (None: float).

    Raises:
      ValueError: ``cut_layer`` outside ``[0, depth]``.
    """
    if not 0 <= cut_layer <= cfg.depth:
        raise ValueError(f"model.cut_layer={cut_layer} must be in [0, {cfg.depth}] (the depth)")
    embed = Embedding(cfg, client_dot_general_cls)
    client_block = Block(cfg, client_dot_general_cls)
    server_block = Block(cfg, server_dot_general_cls)
    head = Head(cfg, server_dot_general_cls)

    def client_apply(params_c: dict, images: jax.Array, key: jax.Array | None = None):
        params_c = lora.dequantize(params_c)  # a QLoRA base, float inside the step
        keys = _segment_keys(key, cut_layer + 1)
        x = embed.apply({"params": params_c["embedding"]}, images, rngs=_rngs(keys[0]))
        for i, name in enumerate(block_names(cut_layer)):
            x = client_block.apply({"params": params_c[name]}, x, rngs=_rngs(keys[i + 1]))
        return x

    def server_apply(params_s: dict, smashed: jax.Array, key: jax.Array | None = None):
        params_s = lora.dequantize(params_s)
        names = block_names(cfg.depth)[cut_layer:]
        keys = _segment_keys(key, len(names) + 1)
        x = smashed
        for i, name in enumerate(names):
            x = server_block.apply({"params": params_s[name]}, x, rngs=_rngs(keys[i]))
        return head.apply({"params": params_s["head"]}, x, rngs=_rngs(keys[-1]))

    return SplitModel(
        client_apply=client_apply,
        server_apply=server_apply,
        cut_layer=cut_layer,
        smashed_shape=(cfg.num_tokens, cfg.hidden_size),
    )


def _segment_keys(key: jax.Array | None, n: int) -> list:
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def num_params(tree) -> int:
    return int(sum(jnp.size(x) for x in jax.tree.leaves(tree)))


def segment_flops(
    model: SplitModel, params_c: dict, params_s: dict, image_shape
) -> tuple[float, float]:
    """Forward FLOPs per sample ``(F_c, F_s)`` of both segments from XLA's cost analysis.

    The segments are lowered and compiled for one sample of ``image_shape`` ``(H, W, C)`` (float
    matmuls, whatever AQT setting the model was built with), so the counts follow the model config
    and the cut layer (SPEC section 3).
    """
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    smashed = jax.ShapeDtypeStruct((1, *model.smashed_shape), jnp.float32)
    key = jax.random.key(0)
    return (
        compiled_flops(lambda p, x: model.client_apply(p, x, key), params_c, images),
        compiled_flops(lambda p, a: model.server_apply(p, a, key), params_s, smashed),
    )


def compiled_flops(fn, *args) -> float:
    """FLOPs of ``fn(*args)`` from XLA's cost analysis of the compiled program (``args`` may be
    ``jax.ShapeDtypeStruct``)."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX returns one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def stored_bytes(tree) -> int:
    """Bytes of a parameter tree as stored (a QLoRA base's codes and scales, not float32)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def adapted_memory_bytes(apply_fn, train, frozen, input_shape, optimizer_slots: int) -> float:
    """Training memory of a segment whose ``train`` part trains and ``frozen`` part (a base,
    possibly quantized) does not: the base as stored, float32 trained parameters, their
    gradients and ``optimizer_slots`` states, and the temporaries XLA keeps to take one gradient
    of the trained part on one batch (its memory analysis; the base's dequantized copies
    included), or of a forward when nothing trains."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)

    def loss(t, f, x):
        return jnp.sum(apply_fn(lora.combine(f, t), x, None))

    # Nothing trains (a frozen segment): the forward's temporaries.
    fn = jax.grad(loss) if num_params(train) else loss
    compiled = jax.jit(fn).lower(train, frozen, x).compile()
    temps = float(compiled.memory_analysis().temp_size_in_bytes)
    return stored_bytes(frozen) + 4.0 * num_params(train) * (2 + optimizer_slots) + temps


def activation_bytes(apply_fn, params: dict, input_shape, key=None) -> float:
    """Bytes XLA keeps live (temporaries) to take one gradient of ``apply_fn`` on one batch.

    ``input_shape`` includes the batch. Measured from the compiled program's memory analysis, so it
    follows the model, the cut and the batch size.
    """
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)

    def loss(p, x):
        return jnp.sum(apply_fn(p, x, key))

    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return float(compiled.memory_analysis().temp_size_in_bytes)
