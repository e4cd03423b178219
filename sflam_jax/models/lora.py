"""Low-rank adapters (LoRA) and the block-quantized frozen base of QLoRA (SPEC section 8).

A targeted dense layer with frozen kernel ``W`` (in x out) computes ``x W + s (x A) B`` with
``A`` (in x r, random), ``B`` (r x out, zeros) and ``s = alpha / r``. The adapters live in the
parameter tree next to the kernel they adapt, under the names Qwix and this package share:
``kernel_lora_a``, ``kernel_lora_b`` and ``kernel_lora_scale`` (the scalar ``s``, frozen; a device
of another rank has another scale). ``Dense`` (every dense layer of the models) adds the branch
when its parameters hold an adapter, so one model serves plain, LoRA and QLoRA trees, AQT matmuls
included (the base goes through AQT's ``dot_general``, the adapter branch stays float, as the
small adapters of a device segment do in practice).

QLoRA stores the frozen kernels at 8 bits (int8, a float32 absmax scale per block of 64 values)
or 4 bits (NF4, QLoRA's normal-float levels, two codes a byte, the same scales). ``dequantize``
restores float32 kernels inside the jitted step; activations and their gradients stay float
(weight-only), so the gradient that crosses the cut is exact up to the base's rounding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LORA_A, LORA_B, LORA_SCALE = "kernel_lora_a", "kernel_lora_b", "kernel_lora_scale"
BLOCK = 64  # values per quantization block (one scale each)
# QLoRA's NF4 levels (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero.
NF4_LEVELS = np.asarray(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Which dense layers ``targets`` names pick (regexes over "/"-joined parameter paths).
TARGET_PRESETS = {
    "attention": r"attention/(query|key|value|out)$",
    "mlp": r"mlp_(in|out)$",
    "all": r"(attention/(query|key|value|out)|mlp_(in|out))$",
}


class Dense(nn.Module):
    """``flax.linen.Dense`` (same parameters, same numbers) plus the LoRA branch when the
    parameters hold ``kernel_lora_a``."""

    features: int
    dot_general_cls: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        dot_general = jax.lax.dot_general
        if self.dot_general_cls is not None:
            dot_general = self.dot_general_cls()
        y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=None)
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if self.has_variable("params", LORA_A):
            a = self.get_variable("params", LORA_A)
            b = self.get_variable("params", LORA_B)
            scale = self.get_variable("params", LORA_SCALE)
            y = y + scale * ((x @ a) @ b)
        return y


def flat_paths(params: Any, with_values: bool = False):
    """The "/"-joined leaf paths of a nested parameter dict (a ``QuantizedKernel`` is one leaf),
    or ``{path: leaf}`` with ``with_values``."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    return flat if with_values else list(flat)


def unflatten(flat: dict) -> dict:
    """The nested dict of ``{"/"-joined path: leaf}`` (``flat_paths(..., with_values=True)``'s
    inverse)."""
    return traverse_util.unflatten_dict(flat, sep="/")


def target_paths(params: dict, targets: str) -> list[str]:
    """The "/"-joined paths of the dense layers (modules holding a 2-D ``kernel``) whose path
    ``targets`` matches (``re.search``; a preset name of ``TARGET_PRESETS`` or a regex)."""
    pattern = re.compile(TARGET_PRESETS.get(targets, targets))
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    layers = [
        p[: -len("/kernel")] for p, v in flat.items() if p.endswith("/kernel") and v.ndim == 2
    ]
    return [p for p in layers if pattern.search(p)]


def add_adapters(params: dict, paths, rank: int, alpha: float, key: jax.Array) -> dict:
    """``params`` with a fresh adapter at each of ``paths``: ``A`` uniform in
    ``+-1/sqrt(in)`` (PEFT's default), ``B = 0`` (the model is unchanged), ``s = alpha / rank``;
    each layer's ``A`` from ``fold_in(key, its index in paths)``."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    for i, path in enumerate(paths):
        fan_in, fan_out = flat[f"{path}/kernel"].shape
        bound = 1.0 / np.sqrt(fan_in)
        k = jax.random.fold_in(key, i)
        flat[f"{path}/{LORA_A}"] = jax.random.uniform(k, (fan_in, rank), jnp.float32, -bound, bound)
        flat[f"{path}/{LORA_B}"] = jnp.zeros((rank, fan_out), jnp.float32)
        flat[f"{path}/{LORA_SCALE}"] = jnp.float32(alpha / rank)
    return traverse_util.unflatten_dict(flat, sep="/")


def is_adapter(path: str, trains_a: bool = True) -> bool:
    """Whether the leaf at ``path`` trains: ``B`` always, ``A`` unless frozen (FFA-LoRA)."""
    name = path.rsplit("/", 1)[-1]
    return name == LORA_B or (trains_a and name == LORA_A)


def partition(params: dict, trains_a: bool = True) -> tuple[dict, dict]:
    """``(adapters, base)``: the trainable adapter leaves and everything else, two nested dicts
    whose union is ``params``."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    train = {p: v for p, v in flat.items() if is_adapter(p, trains_a)}
    rest = {p: v for p, v in flat.items() if not is_adapter(p, trains_a)}
    return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(rest, sep="/")


def combine(*trees: dict) -> dict:
    """The union of nested parameter dicts with disjoint leaves (``partition``'s inverse)."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def merge(params: dict) -> dict:
    """Adapters folded into their kernels: ``W + s A B`` (the same model without adapters)."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    out = {
        p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in (LORA_A, LORA_B, LORA_SCALE)
    }
    for path in [p[: -len(LORA_A) - 1] for p in flat if p.endswith(LORA_A)]:
        delta = flat[f"{path}/{LORA_A}"] @ flat[f"{path}/{LORA_B}"]
        out[f"{path}/kernel"] = flat[f"{path}/kernel"] + flat[f"{path}/{LORA_SCALE}"] * delta
    return traverse_util.unflatten_dict(out, sep="/")


# -- the quantized base ----------------------------------------------------------------------


@flax.struct.dataclass
class QuantizedKernel:
    """A frozen kernel stored block-wise: ``codes`` (int8 values, or NF4 indices two a byte),
    one float32 ``scales`` entry (the block's absmax) per ``BLOCK`` values, row-major."""

    codes: jax.Array
    scales: jax.Array
    shape: tuple = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        return int(self.codes.size * self.codes.dtype.itemsize + self.scales.size * 4)


def quantize_kernel(w: jax.Array, bits: int) -> QuantizedKernel:
    """Block-wise absmax quantization of ``w`` at 8 (int8) or 4 (NF4) bits; the last block is
    zero-padded."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is invalid: the base is stored at 4 (NF4) or 8 (int8) bits")
    flat = jnp.ravel(jnp.asarray(w, jnp.float32))
    pad = -flat.size % BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    unit = blocks / scales[:, None]
    if bits == 8:
        codes = jnp.round(unit * 127.0).astype(jnp.int8)
    else:
        levels = jnp.asarray(NF4_LEVELS)
        idx = jnp.argmin(jnp.abs(unit[..., None] - levels), axis=-1).astype(jnp.uint8)
        idx = idx.reshape(-1, 2)
        codes = idx[:, 0] | (idx[:, 1] << 4)
    return QuantizedKernel(codes, scales, tuple(w.shape), bits)


def dequantize_kernel(q: QuantizedKernel) -> jax.Array:
    """The float32 kernel of ``q``."""
    if q.bits == 8:
        unit = q.codes.astype(jnp.float32) / 127.0
    else:
        idx = jnp.stack([q.codes & 0xF, q.codes >> 4], axis=-1).reshape(-1)
        unit = jnp.asarray(NF4_LEVELS)[idx]
    values = unit.reshape(-1, BLOCK) * q.scales[:, None]
    return values.reshape(-1)[: int(np.prod(q.shape))].reshape(q.shape)


def quantize_base(params: dict, bits: int) -> dict:
    """Every dense kernel of ``params`` (a 2-D leaf named ``kernel``) as a ``QuantizedKernel``;
    ``bits = 0`` returns ``params`` unchanged."""
    if not bits:
        return params
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    out = {
        p: quantize_kernel(v, bits) if p.endswith("/kernel") and np.ndim(v) == 2 else v
        for p, v in flat.items()
    }
    return traverse_util.unflatten_dict(out, sep="/")


def dequantize(params: Any) -> Any:
    """``params`` with every ``QuantizedKernel`` restored to float32 (inside the jitted step)."""
    return jax.tree.map(
        lambda v: dequantize_kernel(v) if isinstance(v, QuantizedKernel) else v,
        params,
        is_leaf=lambda v: isinstance(v, QuantizedKernel),
    )
