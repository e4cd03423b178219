"""Vision Transformer backbone as an embedding, a list of pre-norm blocks and a head.

The parameter tree of ``ViT`` is ``{"embedding", "block_0", ..., "block_{depth-1}", "head"}`` so
that ``split.py`` can hand the first entries to a device and the rest to the server without renaming
anything. Every matmul (the dense layers and both attention products) goes through one injectable
``dot_general_cls``: None means float ``lax.dot_general``, otherwise an AQT module (see quant.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sflam_jax.models import lora

# name -> (hidden, depth, heads, mlp, patch). Patch sizes are defaults for 224 px inputs except
# the small presets, which are meant for 28-32 px images.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (32, 2, 2, 64, 7),
    "mini": (64, 4, 4, 128, 7),
    "ti16": (192, 12, 3, 768, 16),
    "s16": (384, 12, 6, 1536, 16),
    "b16": (768, 12, 12, 3072, 16),
    "b32": (768, 12, 12, 3072, 32),
    "l16": (1024, 24, 16, 4096, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT; image size, channels and classes come from the data."""

    image_size: int
    channels: int
    num_classes: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    # DINOv2's per-channel scales on both residual branches (``layer_scale1``, ``layer_scale2``
    # in each block, initialised to 1).
    layer_scale: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1


def _dense(features: int, dg_cls: Callable | None, name: str) -> lora.Dense:
    return lora.Dense(features, dot_general_cls=dg_cls, name=name)


def _matmul(dg_cls: Callable | None, name: str, lhs, rhs, dimension_numbers):
    if dg_cls is None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers)
    return dg_cls(name=name)(lhs, rhs, dimension_numbers, None)


class Embedding(nn.Module):
    """Patch embedding (a dense layer on flattened patches), class token, position embedding."""

    cfg: ViTConfig
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        # images [B, H, W, C] -> tokens [B, N + 1, D]
        b, h, w, c = images.shape
        p = self.cfg.patch_size
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        x = _dense(self.cfg.hidden_size, self.dot_general_cls, "patch")(x)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.cfg.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, x.shape[-1])), x], axis=1)
        pos = self.param(
            "position", nn.initializers.normal(0.02), (1, x.shape[1], self.cfg.hidden_size)
        )
        return x + pos


class Attention(nn.Module):
    cfg: ViTConfig
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        heads = self.cfg.num_heads
        dg = self.dot_general_cls

        def project(name):
            return _dense(d, dg, name)(x).reshape(b, t, heads, d // heads)

        q, k, v = project("query"), project("key"), project("value")
        q = q / jnp.sqrt(d // heads).astype(x.dtype)
        # scores [B, H, Tq, Tk]: contract head_dim, batch over (B, H).
        scores = _matmul(dg, "scores", q, k, (((3,), (3,)), ((0, 2), (0, 2))))
        probs = jax.nn.softmax(scores, axis=-1)
        # out [B, H, Tq, hd]: contract Tk, batch over (B, H).
        out = _matmul(dg, "mix", probs, v, (((3,), (1,)), ((0, 1), (0, 2))))
        out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
        return _dense(d, dg, "out")(out)


class Block(nn.Module):
    """Pre-norm encoder block: x + MHA(LN(x)), then x + MLP(LN(x)); with ``cfg.layer_scale`` each
    branch is scaled per channel first (x + g1 * MHA(LN(x)), as DINOv2)."""

    cfg: ViTConfig
    dot_general_cls: Any = None

    def _scaled(self, name: str, y: jax.Array) -> jax.Array:
        if not self.cfg.layer_scale:
            return y
        return y * self.param(name, nn.initializers.ones, (self.cfg.hidden_size,))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        eps = self.cfg.layer_norm_eps
        dg = self.dot_general_cls
        y = Attention(self.cfg, dg, name="attention")(nn.LayerNorm(eps, name="norm1")(x))
        x = x + self._scaled("layer_scale1", y)
        y = nn.LayerNorm(eps, name="norm2")(x)
        y = _dense(self.cfg.mlp_dim, dg, "mlp_in")(y)
        y = nn.gelu(y, approximate=False)
        y = _dense(self.cfg.hidden_size, dg, "mlp_out")(y)
        return x + self._scaled("layer_scale2", y)


class Head(nn.Module):
    """Final norm and the classifier on the class token."""

    cfg: ViTConfig
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.LayerNorm(self.cfg.layer_norm_eps, name="norm")(x)
        return _dense(self.cfg.num_classes, self.dot_general_cls, "classifier")(x[:, 0])


class ViT(nn.Module):
    """The unsplit model; ``split.py`` cuts its parameter tree into client and server segments."""

    cfg: ViTConfig
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = Embedding(self.cfg, self.dot_general_cls, name="embedding")(images)
        for i in range(self.cfg.depth):
            x = Block(self.cfg, self.dot_general_cls, name=f"block_{i}")(x)
        return Head(self.cfg, self.dot_general_cls, name="head")(x)


def block_names(depth: int) -> list[str]:
    return [f"block_{i}" for i in range(depth)]


def vit_config(
    preset: str,
    *,
    image_size: int,
    channels: int,
    num_classes: int,
    patch_size: int | None = None,
    layer_norm_eps: float = 1e-6,
) -> ViTConfig:
    """Builds a ``ViTConfig`` from a preset name and the data's shape.

    Raises:
      ValueError: unknown preset, or an image size the patch size does not divide.
    """
    if preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r} is unknown; allowed: {sorted(PRESETS)}")
    hidden, depth, heads, mlp, default_patch = PRESETS[preset]
    patch = patch_size or default_patch
    if image_size % patch:
        raise ValueError(
            f"model.patch_size={patch} must divide the image size {image_size} "
            "(set model.patch_size or data.image_size)"
        )
    return ViTConfig(
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        layer_norm_eps=layer_norm_eps,
    )


def init_params(cfg: ViTConfig, key: jax.Array) -> dict:
    """Random parameters of the whole model (float32)."""
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return ViT(cfg).init({"params": key}, x)["params"]


# Logical axis names of each parameter, by (module, parameter) name; ``sharding.py`` maps them to
# mesh axes through ``config.sharding.rules``. "heads" is the attention width (heads x head_dim),
# "mlp" the hidden width of the MLP, "embed" the model width.
_LOGICAL_AXES = {
    ("query", "kernel"): ("embed", "heads"),
    ("key", "kernel"): ("embed", "heads"),
    ("value", "kernel"): ("embed", "heads"),
    ("query", "bias"): ("heads",),
    ("key", "bias"): ("heads",),
    ("value", "bias"): ("heads",),
    ("out", "kernel"): ("heads", "embed"),
    ("mlp_in", "kernel"): ("embed", "mlp"),
    ("mlp_in", "bias"): ("mlp",),
    ("mlp_out", "kernel"): ("mlp", "embed"),
    ("patch", "kernel"): ("patch", "embed"),
    ("classifier", "kernel"): ("embed", "classes"),
    ("classifier", "bias"): ("classes",),
    ("cls", None): (None, None, "embed"),
    ("position", None): (None, "tokens", "embed"),
}


def logical_axes(params: dict) -> dict:
    """A tree like ``params`` whose leaves are tuples of logical axis names (None: unnamed).

    Biases and norm parameters of width ``hidden_size`` are ("embed",).
    """

    def names(path, x):
        keys = [getattr(p, "key", None) for p in path]
        for lookup in ((keys[-2] if len(keys) > 1 else None, keys[-1]), (keys[-1], None)):
            if lookup in _LOGICAL_AXES:
                return _LOGICAL_AXES[lookup]
        return ("embed",) if x.ndim == 1 else (None,) * x.ndim

    return jax.tree_util.tree_map_with_path(names, params)
