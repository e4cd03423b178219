"""What every benchmark records about its machine: the CPU model and a dense-matmul yardstick.

Benchmark ratios move between machines (docs/benchmarks.md), so each JSON names the machine it ran
on and the speed of a dense float32 2048^3 matmul measured in the same run.
"""

import os
import platform
import time

import numpy as np


def machine() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one), its architecture and cores."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        name = f"{names[0]} ({platform.machine()})" if names else name
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def matmul_seconds(lhs_shape: tuple, rhs_shape: tuple, repeats: int) -> float:
    """Median time of a jitted float32 ``jnp.matmul`` of random operands of these shapes."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), lhs_shape, jnp.float32)
    b = jax.random.normal(jax.random.key(1), rhs_shape, jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 ``[n, n] x [n, n]`` matmul throughput under jit (median of ``repeats``)."""
    return 2.0 * n**3 / matmul_seconds((n, n), (n, n), repeats)


def describe() -> dict:
    """``{"machine": CPU model and cores, "dense_matmul_gflops": measured now}``."""
    return {"machine": machine(), "dense_matmul_gflops": matmul_flops_per_s() / 1e9}
