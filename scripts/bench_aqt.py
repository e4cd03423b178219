"""Cost of AQT integer matmuls on this backend, side by side with float (ratios, same run).

    python scripts/bench_aqt.py [--out results/bench/aqt_cpu.json] [--steps 30]

Times one jitted SFLAM training step (client forward, 8-bit cut, server forward and backward, client
backward) of the default model (the "mini" ViT on 28x28 inputs, batch 32) for several AQT
placements, and one dense matmul forward+backward, each relative to float. Prints a markdown table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import benchlib
import jax
import jax.numpy as jnp
import optax

from sflam_jax import quant
from sflam_jax.models import split as split_lib
from sflam_jax.models import vit

VARIANTS = {
    # name: (client (fwd, bwd) bits, server (fwd, bwd) bits); None = float
    "float": (None, None),
    "client int8 fwd+bwd (default)": ((8, 8), None),
    "both int8 fwd, float bwd": ((8, None), (8, None)),
    "both int8 fwd+bwd": ((8, 8), (8, 8)),
}


def _time(fn, args, steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return compile_s, times[len(times) // 2]


def bench_step(client_bits, server_bits, steps, cut_layer):
    cfg = vit.vit_config("mini", image_size=28, channels=1, num_classes=10)
    dg = lambda bits: quant.aqt_dot_general_cls(*bits) if bits else None  # noqa: E731
    model = split_lib.split(cfg, cut_layer, dg(client_bits), dg(server_bits))
    params_c, params_s = split_lib.split_params(
        vit.init_params(cfg, jax.random.key(0)), cut_layer, cfg.depth
    )
    x = jax.random.normal(jax.random.key(1), (32, 28, 28, 1))
    y = jnp.arange(32) % 10

    def loss(pc, ps, key):
        k1, k2, k3 = jax.random.split(key, 3)
        a = quant.cut_layer_channel(model.client_apply(pc, x, k1), 8, 32, k2)
        return optax.softmax_cross_entropy_with_integer_labels(
            model.server_apply(ps, a, k3), y
        ).mean()

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return _time(step, (params_c, params_s, jax.random.key(2)), steps)


def bench_matmul(bits, steps):
    import flax.linen as nn

    dense = nn.Dense(192, dot_general_cls=quant.aqt_dot_general_cls(*bits) if bits else None)
    x = jax.random.normal(jax.random.key(0), (1040, 64))
    params = dense.init(jax.random.key(1), x)

    def loss(p, key):
        return jnp.sum(dense.apply(p, x, rngs={"params": key}) ** 2)

    return _time(jax.jit(jax.grad(loss)), (params, jax.random.key(2)), steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench/aqt_cpu.json")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for cut in (0, 2):
        base = None
        for name, (cb, sb) in VARIANTS.items():
            compile_s, step_s = bench_step(cb, sb, args.steps, cut)
            base = base or step_s
            rows.append(
                {
                    "what": f"SFLAM step, cut_layer={cut}: {name}",
                    "compile_s": compile_s,
                    "step_ms": step_s * 1e3,
                    "vs_float": step_s / base,
                }
            )
            print(rows[-1], flush=True)
    base = None
    for name, bits in (("float", None), ("int8 fwd", (8, None)), ("int8 fwd+bwd", (8, 8))):
        compile_s, step_s = bench_matmul(bits, args.steps)
        base = base or step_s
        rows.append(
            {
                "what": f"dense 1040x64x192 fwd+bwd: {name}",
                "compile_s": compile_s,
                "step_ms": step_s * 1e3,
                "vs_float": step_s / base,
            }
        )
        print(rows[-1], flush=True)
    result = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        **benchlib.describe(),
        "jax": jax.__version__,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print("\n| what | compile s | step ms | vs float |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | {r['vs_float']:.2f}x |")


if __name__ == "__main__":
    main()
