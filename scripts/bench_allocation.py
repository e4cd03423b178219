"""Allocation solvers side by side: solve time after compile and objective on the same instances.

    python scripts/bench_allocation.py [--sizes 10 100 1000 10000] [--batch 1024]
        [--out results/bench/allocation_cpu.json]

For each S: one random instance (default system constants, the default model's workload, fixed
8 bits, w_T = 0.5), solved by ``pgd``, ``bcd``, ``exact`` (float64 nested bisection) and SciPy's
SLSQP on the epigraph form (variables p / P_max, beta / B, T / T_ref, analytic JAX gradients).
SLSQP's dense QP is O(S^3) per iteration, so it is skipped above ``--slsqp-max``.
Then a batch of ``--batch`` scenarios at S = 10 through ``jax.vmap`` against a Python loop of
jitted single solves. Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import benchlib
import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax.allocation import bcd, exact, pgd
from sflam_jax.allocation import problem as pb
from sflam_jax.wireless import channel, costs

PARAMS = channel.SystemParams()
# The default config's workload (mini ViT on 28 px, cut 0, batch 32), rounded.
WORK = costs.Workload(
    client_flops=1.1e5,
    server_flops=5.0e6,
    values_per_sample=17 * 64,
    client_params=4224,
    batch_size=32,
)


def instance(key, s):
    devices = channel.draw_devices(key, s, PARAMS)
    steps = jax.random.randint(jax.random.fold_in(key, 1), (s,), 5, 80).astype(jnp.float32)
    return pb.make_problem(devices, steps, steps / steps.sum(), WORK, PARAMS, pb.Weights())


def timed(fn, *args, repeats=3):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return out, first, min(runs)


def slsqp(problem, bits, max_iter=300):
    from scipy.optimize import minimize

    s = problem.num_devices
    with jax.enable_x64(True):
        prob = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), problem)
        t_ref, e_ref = float(prob.t_ref), float(prob.e_ref)

        def unpack(x):
            alloc = pb.Allocation(
                power_w=x[:s] * PARAMS.p_max_w,
                bandwidth_hz=x[s : 2 * s] * PARAMS.bandwidth_hz,
                bits=jnp.asarray(bits, jnp.float64),
            )
            return alloc, x[-1] * t_ref

        def objective(x):
            alloc, deadline = unpack(x)
            energy = pb.evaluate(prob, alloc)["round_energy_j"]
            return prob.w_t * deadline / t_ref + prob.w_e * energy / e_ref

        def deadlines(x):  # >= 0: T - T_k
            alloc, deadline = unpack(x)
            return (deadline - pb.evaluate(prob, alloc)["latency_s"]) / t_ref

        f, df = jax.jit(objective), jax.jit(jax.grad(objective))
        c, dc = jax.jit(deadlines), jax.jit(jax.jacobian(deadlines))
        x0 = np.concatenate([np.ones(s), np.full(s, 1.0 / s), [1.0]])
        constraints = [
            {"type": "ineq", "fun": lambda x: np.asarray(c(x)), "jac": lambda x: np.asarray(dc(x))},
            {
                "type": "ineq",
                "fun": lambda x: 1.0 - np.sum(x[s : 2 * s]),
                "jac": lambda x: np.concatenate([np.zeros(s), -np.ones(s), [0.0]]),
            },
        ]
        bounds = [(1e-6, 1.0)] * s + [(1e-9, 1.0)] * s + [(1e-6, None)]
        f(x0), df(x0), c(x0), dc(x0)  # compile outside the timing
        t0 = time.perf_counter()
        res = minimize(
            lambda x: float(f(x)),
            x0,
            jac=lambda x: np.asarray(df(x)),
            bounds=bounds,
            constraints=constraints,
            method="SLSQP",
            options={"maxiter": max_iter, "ftol": 1e-12},
        )
        elapsed = time.perf_counter() - t0
        alloc, _ = unpack(jnp.asarray(res.x))
        alloc = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), alloc)
    # Score the returned point as it stands (its own deadline may be violated slightly).
    return float(pb.evaluate(problem, alloc)["objective"]), elapsed, bool(res.success), int(res.nit)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--slsqp-max", type=int, default=1000)
    parser.add_argument(
        "--slsqp-maxiter", type=int, default=300, help="SLSQP iteration cap (its time grows ~S^3)"
    )
    parser.add_argument("--out", default="results/bench/allocation_cpu.json")
    args = parser.parse_args()
    rows = []
    for s in args.sizes:
        problem = instance(jax.random.key(s), s)
        bits = jnp.full((s,), 8.0)
        ref_alloc, ref = exact.allocate(problem, bits)  # compiles
        t0 = time.perf_counter()
        _, ref = exact.allocate(problem, bits)
        exact_s = time.perf_counter() - t0
        best = float(ref["objective"])
        row = {"S": s, "exact": {"objective": best, "solve_s": exact_s}}
        for name, fn in (("pgd", pgd.allocate), ("bcd", bcd.allocate)):
            (_, diag), first, solve = timed(jax.jit(lambda p, b, f=fn: f(p, b)), problem, bits)
            row[name] = {
                "objective": float(diag["objective"]),
                "gap_vs_exact": float(diag["objective"]) / best - 1,
                "solve_s": solve,
                "compile_s": first - solve,
            }
        if s <= args.slsqp_max:
            value, elapsed, ok, nit = slsqp(problem, bits, args.slsqp_maxiter)
            row["slsqp"] = {
                "objective": value,
                "gap_vs_exact": value / best - 1,
                "solve_s": elapsed,
                "success": ok,
                "iterations": nit,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Batch of scenarios at S = 10: vmap against a loop of jitted single solves.
    s, n = 10, args.batch
    keys = jax.random.split(jax.random.key(7), n)
    batch = jax.vmap(lambda k: instance(k, s))(keys)
    bits = jnp.full((n, s), 8.0)
    vmapped = jax.jit(jax.vmap(lambda p, b: pgd.allocate(p, b)))
    _, _, vmap_s = timed(vmapped, batch, bits, repeats=1)
    single = jax.jit(lambda p, b: pgd.allocate(p, b))
    one = lambda i: jax.tree.map(lambda x: x[i], batch)  # noqa: E731
    jax.block_until_ready(single(one(0), bits[0]))
    t0 = time.perf_counter()
    for i in range(n):
        jax.block_until_ready(single(one(i), bits[i]))
    loop_s = time.perf_counter() - t0
    batch_row = {
        "S": s,
        "scenarios": n,
        "vmap_s": vmap_s,
        "loop_s": loop_s,
        "vmap_ms_per_scenario": 1e3 * vmap_s / n,
        "loop_ms_per_scenario": 1e3 * loop_s / n,
        "speedup": loop_s / vmap_s,
    }
    print(json.dumps(batch_row), flush=True)
    result = {
        "backend": jax.default_backend(),
        **benchlib.describe(),
        "jax": jax.__version__,
        "instances": rows,
        "batch": batch_row,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)

    print("\n| S | solver | objective | gap vs exact | solve s |\n|---|---|---|---|---|")
    for row in rows:
        for name in ("exact", "pgd", "bcd", "slsqp"):
            if name in row:
                r = row[name]
                gap = f"{r.get('gap_vs_exact', 0.0):+.2e}"
                print(
                    f"| {row['S']} | {name} | {r['objective']:.6f} | {gap} | {r['solve_s']:.3f} |"
                )
    print(
        f"\nvmap of {n} scenarios (S={s}): {batch_row['vmap_ms_per_scenario']:.2f} ms/scenario; "
        f"loop: {batch_row['loop_ms_per_scenario']:.2f} ms/scenario "
        f"({batch_row['speedup']:.1f}x)"
    )


if __name__ == "__main__":
    main()
