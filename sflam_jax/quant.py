"""Cut-layer quantizer (SPEC section 2) and the AQT dot_general factory.

The cut-layer quantizer models what crosses the wireless link between a device and the edge
server: per-sample stochastic uniform quantization with ``b`` bits, unbiased, with a
straight-through backward pass. ``b`` may be a traced value, so every client of a vmapped round can
use its own bit width. ``b >= 32`` means "send float32" and is the identity.

The AQT factory is the single injection point for quantized matmuls inside the model segments
(``aqtp``, ``aqt.jax.v2``); nothing else in the package imports AQT.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

FLOAT_BITS = 32
# Two float32 values (the sample's min and max) travel with every quantized sample.
SIDE_INFO_BITS = 64


def _per_sample_range(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    axes = tuple(range(1, a.ndim))
    return jnp.min(a, axis=axes, keepdims=True), jnp.max(a, axis=axes, keepdims=True)


def stochastic_quantize(a: jax.Array, bits: jax.Array | int, key: jax.Array) -> jax.Array:
    """Per-sample stochastic uniform quantization, SPEC section 2 (no gradient rule).

    ``Delta = (max - min) / (2^b - 1)``, ``u = (a - min) / Delta``,
    ``Q(a) = min + Delta * (floor(u) + Bernoulli(u - floor(u)))``.

    Args:
      a: activations ``[B, ...]``; min and max are taken per sample over all trailing axes.
      bits: bit width, a Python int or a traced scalar; ``>= 32`` returns ``a`` unchanged.
      key: PRNG key for the rounding noise; the same key gives the same result.

    Returns:
      The quantized values, same shape and dtype as ``a``, inside ``[min, max]`` of each sample.
    """
    bits = jnp.asarray(bits, jnp.float32)
    lo, hi = _per_sample_range(a)
    levels = jnp.exp2(jnp.minimum(bits, FLOAT_BITS - 1)) - 1.0
    spread = hi - lo
    # A constant sample has zero spread: any positive step maps it onto itself.
    delta = jnp.where(spread > 0, spread / levels, 1.0)
    u = jnp.clip((a - lo) / delta, 0.0, levels)
    floor_u = jnp.floor(u)
    up = jax.random.uniform(key, a.shape, a.dtype) < (u - floor_u)
    q = jnp.clip(lo + delta * (floor_u + up.astype(a.dtype)), lo, hi)
    return jnp.where(bits >= FLOAT_BITS, a, q.astype(a.dtype))


@jax.custom_vjp
def _straight_through(a: jax.Array, a_hat: jax.Array) -> jax.Array:
    del a
    return a_hat


def _straight_through_fwd(a, a_hat):
    del a
    return a_hat, None


def _straight_through_bwd(_, g):
    # The gradient with respect to the quantized values is applied to the unquantized ones.
    return g, jnp.zeros_like(g)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def quantize(a: jax.Array, bits: jax.Array | int, key: jax.Array) -> jax.Array:
    """Cut-layer quantization with a straight-through gradient.

    Args:
      a: activations ``[B, ...]``.
      bits: bit width (int or traced scalar); ``>= 32`` is the identity.
      key: PRNG key for the rounding noise.

    Returns:
      ``Q_b(a)``; its gradient with respect to ``a`` is the identity.
    """
    a_hat = stochastic_quantize(jax.lax.stop_gradient(a), bits, key)
    return _straight_through(a, a_hat)


@jax.custom_vjp
def _cut_channel(a, a_hat, g_bits, g_key):
    del a, g_bits, g_key
    return a_hat


def _cut_channel_fwd(a, a_hat, g_bits, g_key):
    del a
    return a_hat, (g_bits, g_key)


def _cut_channel_bwd(res, g):
    g_bits, g_key = res
    g_hat = stochastic_quantize(g, g_bits, g_key)
    return g_hat, jnp.zeros_like(g), None, None


_cut_channel.defvjp(_cut_channel_fwd, _cut_channel_bwd)


def cut_layer_channel(
    a: jax.Array, up_bits: jax.Array | int, down_bits: jax.Array | int, key: jax.Array
) -> jax.Array:
    """The split link of SPEC section 1: quantized uplink forward, quantized downlink backward.

    The forward pass returns ``Q_{up_bits}(a)`` (the smashed data the server receives). The
    backward pass returns ``Q_{down_bits}(dL/da_hat)`` as the gradient of ``a``: the device
    back-propagates the quantized gradient it received, straight through the uplink quantizer.

    Args:
      a: smashed data ``[B, ...]``.
      up_bits: uplink bit width (traced scalar allowed); ``>= 32`` sends float32.
      down_bits: downlink bit width for the returned gradient; ``>= 32`` sends float32.
      key: PRNG key; split internally into an uplink and a downlink key.

    Returns:
      ``a_hat`` with the same shape as ``a``.
    """
    up_key, down_key = jax.random.split(key)
    a_hat = stochastic_quantize(jax.lax.stop_gradient(a), up_bits, up_key)
    return _cut_channel(a, a_hat, jnp.asarray(down_bits, jnp.float32), down_key)


def payload_bits(bits: jax.Array | int, values_per_sample: int) -> jax.Array:
    """Bits on the air for one sample of smashed data (SPEC sections 2 and 3).

    Args:
      bits: bit width per value; ``>= 32`` means float32 without side information.
      values_per_sample: Gamma, the number of values per sample at the cut.

    Returns:
      ``Gamma * b + 64`` for ``b < 32`` and ``32 * Gamma`` otherwise (float32 scalar or array).
    """
    bits = jnp.asarray(bits, jnp.float32)
    quantized = values_per_sample * bits + SIDE_INFO_BITS
    return jnp.where(bits >= FLOAT_BITS, FLOAT_BITS * values_per_sample, quantized)


def error_proxy(
    bits: jax.Array | int, values_per_sample: int, value_range: jax.Array | float
) -> jax.Array:
    """Quantization error proxy ``delta(b) = Gamma range^2 / (4 (2^b - 1)^2)``, SPEC section 2.

    Args:
      bits: bit width (may be a relaxed, non-integer value); ``>= 32`` gives 0.
      values_per_sample: Gamma.
      value_range: ``max - min`` of a sample's values.

    Returns:
      An upper bound on the summed per-value variance of one quantized sample.
    """
    bits = jnp.asarray(bits, jnp.float32)
    levels = jnp.exp2(jnp.minimum(bits, FLOAT_BITS - 1)) - 1.0
    bound = values_per_sample * jnp.square(value_range) / (4.0 * jnp.square(levels))
    return jnp.where(bits >= FLOAT_BITS, 0.0, bound)


def aqt_dot_general_cls(fwd_bits: int | None, bwd_bits: int | None) -> Callable | None:
    """Factory of AQT ``dot_general`` modules for Flax layers (the one AQT injection point).

    Args:
      fwd_bits: integer bits of both forward operands; None keeps the forward in float.
      bwd_bits: integer bits of the backward matmuls; None keeps the backward in float.

    Returns:
      A zero-argument constructor of an ``AqtDotGeneral`` module (for ``nn.Dense(dot_general_cls=)``
      and the attention products), or None when both sides are float. Stochastic rounding of the
      backward pass draws from the ``params`` RNG stream at apply time.
    """
    if fwd_bits is None and bwd_bits is None:
        return None
    from aqt.jax.v2 import config as aqt_config
    from aqt.jax.v2.flax import aqt_flax

    cfg = aqt_config.fully_quantized(
        fwd_bits=fwd_bits,
        bwd_bits=bwd_bits,
        use_stochastic_rounding=bwd_bits is not None,
    )
    return functools.partial(aqt_flax.AqtDotGeneral, cfg)


def segment_dot_generals(aqt_cfg, allowed: bool = True) -> tuple[Callable | None, Callable | None]:
    """``(client, server)`` matmul injections of a split model from ``config.aqt``: AQT on the
    segments it names when enabled (and ``allowed`` by the protocol), else float (None)."""
    if not (allowed and aqt_cfg.enabled):
        return None, None
    dg = aqt_dot_general_cls(aqt_cfg.fwd_bits or None, aqt_cfg.bwd_bits or None)
    return (dg if aqt_cfg.client else None), (dg if aqt_cfg.server else None)
