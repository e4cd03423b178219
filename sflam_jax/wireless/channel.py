"""Device geometry, channel gains and FDMA link rates (SPEC section 3).

All functions are pure ``jnp`` over arrays of devices; add leading axes (or ``vmap``) for many
scenarios. Units are SI: m, W, Hz, bit/s.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SystemParams:
    """Constants of the wireless and compute model; every field is a config default (SPEC 3).

    Attributes:
      radius_m: cell radius; devices are uniform in the disc.
      min_distance_m: smallest device-server distance.
      shadowing_std_db: log-normal shadowing standard deviation.
      noise_dbm_per_hz: noise power spectral density N0.
      bandwidth_hz: total uplink bandwidth B shared by FDMA.
      p_max_w: device transmit power limit.
      server_power_w: downlink transmit power P_s (not optimised).
      cpu_min_hz, cpu_max_hz: device clock range, f_k ~ U[min, max].
      flops_per_cycle: phi.
      kappa: effective switched capacitance (energy per cycle is kappa f^2).
      server_flops: F_server, shared equally by the S server copies.
    """

    radius_m: float = 250.0
    min_distance_m: float = 10.0
    shadowing_std_db: float = 8.0
    noise_dbm_per_hz: float = -174.0
    bandwidth_hz: float = 20e6
    p_max_w: float = 0.2
    server_power_w: float = 1.0
    cpu_min_hz: float = 0.5e9
    cpu_max_hz: float = 2.0e9
    flops_per_cycle: float = 16.0
    kappa: float = 1e-28
    server_flops: float = 100e12

    @classmethod
    def from_config(cls, wireless) -> SystemParams:
        """The constants of a ``config.wireless`` block."""
        return cls(**{k: float(v) for k, v in wireless.items()})

    @property
    def noise_w_per_hz(self) -> float:
        return 10.0 ** ((self.noise_dbm_per_hz - 30.0) / 10.0)


@flax.struct.dataclass
class Devices:
    """One scenario's devices.

    Attributes:
      distance_m: ``[S]`` distance to the edge server.
      gain: ``[S]`` linear channel power gain G_k (path loss x shadowing x Rayleigh fading).
      cpu_hz: ``[S]`` clock frequency f_k.
    """

    distance_m: jax.Array
    gain: jax.Array
    cpu_hz: jax.Array


def path_loss_db(distance_m: jax.Array) -> jax.Array:
    """``PL(d) = 128.1 + 37.6 log10(d / 1 km)`` in dB."""
    return 128.1 + 37.6 * jnp.log10(distance_m / 1000.0)


def draw_devices(key: jax.Array, num_devices: int, params: SystemParams) -> Devices:
    """Draws positions (uniform in the annulus), shadowing, Rayleigh fading and clocks.

    Args:
      key: PRNG key of the scenario (the trainer uses the round's key).
      num_devices: S.
      params: the system constants.

    Returns:
      ``Devices`` with ``[S]`` arrays.
    """
    k_pos, k_shadow, k_fade, k_cpu = jax.random.split(key, 4)
    r0, r1 = params.min_distance_m, params.radius_m
    # Uniform in area: r^2 uniform between r0^2 and r1^2.
    u = jax.random.uniform(k_pos, (num_devices,))
    distance = jnp.sqrt(r0**2 + u * (r1**2 - r0**2))
    shadow_db = params.shadowing_std_db * jax.random.normal(k_shadow, (num_devices,))
    fading = jax.random.exponential(k_fade, (num_devices,))
    gain = 10.0 ** (-(path_loss_db(distance) - shadow_db) / 10.0) * fading
    cpu = jax.random.uniform(
        k_cpu, (num_devices,), minval=params.cpu_min_hz, maxval=params.cpu_max_hz
    )
    return Devices(distance_m=distance, gain=gain, cpu_hz=cpu)


def rate_bps(
    bandwidth_hz: jax.Array, power_w: jax.Array, gain: jax.Array, noise_w_per_hz: float
) -> jax.Array:
    """Shannon rate of an FDMA share: ``beta log2(1 + p G / (beta N0))`` in bit/s (0 at beta=0).

    Args:
      bandwidth_hz: ``[...]`` bandwidth share beta_k >= 0.
      power_w: ``[...]`` transmit power p_k >= 0.
      gain: ``[...]`` channel gain G_k.
      noise_w_per_hz: N0 in W/Hz.
    """
    safe_bw = jnp.where(bandwidth_hz > 0, bandwidth_hz, 1.0)
    # G / N0 first: the product beta N0 (~1e-13 W) would square to ~1e-26 in the gradient, which
    # XLA's fused float32 code flushes to zero (an infinite gradient).
    snr = power_w * (gain / noise_w_per_hz) / safe_bw
    return jnp.where(bandwidth_hz > 0, safe_bw * jnp.log1p(snr) / jnp.log(2.0), 0.0)
