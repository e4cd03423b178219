"""Per-device cut solvers side by side: time and optimality gap against ESFL's exact optimum.

    python scripts/bench_cuts.py [--sizes 10 100 1000] [--out results/bench/cuts_cpu.json]
        [--server-flops 1e14] [--memory-mib 64 1024]

The default config's model (mini ViT on Fashion-MNIST's 28 px, batch 32) with every block boundary
a candidate cut, each cut's FLOPs, sizes and training memory from XLA's analyses
(``experiment.planner_for``). For each S, one round's instance as the ESFL planner draws it
(channels, clocks, memory limits ~ U[--memory-mib], local steps of non-IID clients of unequal
size: Dirichlet(0.5) shares of 60000 samples), solved by

- ``esfl_exact``: ESFL's optimum (min T_round over cuts and server shares at equal bandwidth, full
  power, 8 bits), float32 in the graph and float64 (the oracle);
- ``esfl_ao``: the paper's alternating optimisation; its gap is ``T_round / T_exact - 1``;
- ``joint``: cuts, shares, power, bandwidth and bits under ``w_T T/T_ref + w_E E/E_ref``
  (w_T = 0.5); its T_round against ESFL's optimum, and its objective against ESFL's optimum
  evaluated in the same objective (at the smallest bits meeting the budget).

Times are after compilation (the best of ``--repeats``), compile times beside. Prints a markdown
table and writes JSON naming the machine.
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

from sflam_jax import experiment
from sflam_jax.allocation import cuts, joint
from sflam_jax.allocation.problem import smallest_bits
from sflam_jax.config import base_config
from sflam_jax.metrics import atomic_write_text


def timed(fn, *args, repeats=2):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    runs, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t0)
    return out, compile_s, min(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--server-flops", type=float, default=None)
    parser.add_argument("--memory-mib", type=float, nargs=2, default=(64.0, 1024.0))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--joint-max", type=int, default=100000, help="largest S the joint allocator runs at"
    )
    parser.add_argument("--out", default="results/bench/cuts_cpu.json")
    args = parser.parse_args()

    config = base_config()
    config.algorithm, config.allocation.method = "esfl", "joint"
    config.esfl.memory_min_bytes = args.memory_mib[0] * 2.0**20
    config.esfl.memory_max_bytes = args.memory_mib[1] * 2.0**20
    if args.server_flops:
        config.wireless.server_flops = args.server_flops
    planner = experiment.planner_for(config, (28, 28, 1), 10)
    w = planner.workload
    at = w.cuts.index(w.cut_layer)
    print(f"cuts {w.cuts}, device memory MiB {[round(m / 2**20, 1) for m in w.cut_memory_bytes]}")

    rows = []
    for s in args.sizes:
        key = jax.random.key(s)
        shares = np.random.default_rng(s).dirichlet(np.full(s, 0.5))
        counts = jnp.asarray(np.maximum(np.round(shares * 60000), 1), jnp.float32)
        steps = jnp.ceil(counts / w.batch_size)
        problem = planner.problem(key, steps)
        rho = counts / jnp.sum(counts)
        bits = jnp.full((s,), 8.0)
        (ex, ex_diag), ex_compile, ex_s = timed(lambda p, b=bits: cuts.exact(p, b), problem)
        with jax.enable_x64(True):
            _, oracle = cuts.exact(problem, bits, dtype=jnp.float64)
        (ao, ao_diag), ao_compile, ao_s = timed(lambda p, b=bits: cuts.alternate(p, b), problem)
        t_exact = float(oracle["deadline_s"])
        row = {
            "S": s,
            "esfl_exact_s": ex_s,
            "esfl_exact_compile_s": ex_compile,
            "esfl_exact_T_s": float(ex_diag["round_latency_s"]),
            "esfl_exact_float64_T_s": t_exact,
            "esfl_exact_float32_gap": float(ex_diag["round_latency_s"]) / t_exact - 1,
            "esfl_ao_s": ao_s,
            "esfl_ao_compile_s": ao_compile,
            "esfl_ao_T_s": float(ao_diag["round_latency_s"]),
            "esfl_ao_gap": float(ao_diag["round_latency_s"]) / t_exact - 1,
            "esfl_exact_cut_mean": float(jnp.mean(w_cut(w, ex.cut))),
            "esfl_ao_cut_mean": float(jnp.mean(w_cut(w, ao.cut))),
        }
        if s <= args.joint_max:
            options = joint.JointOptions(pgd=planner.pgd)
            (jo, jo_diag), jo_compile, jo_s = timed(
                lambda p, r, o=options: joint.allocate(p, r, planner.weights, w, at, o),
                problem,
                rho,
            )
            ref = joint._Joint(problem, rho, planner.weights, w, at)
            esfl_at_budget, _ = cuts.exact(problem, smallest_bits(ref.links))
            t_joint = float(cuts.round_costs(problem, jo)["round_latency_s"])
            row.update(
                joint_s=jo_s,
                joint_compile_s=jo_compile,
                joint_T_s=t_joint,
                joint_T_over_exact=t_joint / t_exact,
                joint_objective=float(jo_diag["objective"]),
                esfl_exact_objective=float(ref.objective(esfl_at_budget)),
                joint_cut_mean=float(jnp.mean(w_cut(w, jo.cut))),
                joint_feasible=bool(jo_diag["feasible"]),
            )
            row["joint_objective_ratio"] = row["joint_objective"] / row["esfl_exact_objective"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        "\n| S | esfl_exact (s) | esfl_ao (s) | ao gap | joint (s) | joint T / ESFL T "
        "| joint objective / ESFL's |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        joint_cells = (
            f"{r['joint_s']:.2f} | {r['joint_T_over_exact']:.3f} | {r['joint_objective_ratio']:.3f}"
            if "joint_s" in r
            else "- | - | -"
        )
        print(
            f"| {r['S']} | {r['esfl_exact_s']:.4f} | {r['esfl_ao_s']:.4f} | "
            f"{100 * r['esfl_ao_gap']:.3f}% | {joint_cells} |"
        )
    out = {
        **benchlib.describe(),
        "server_flops": planner.params.server_flops,
        "memory_mib": list(args.memory_mib),
        "cuts": list(w.cuts),
        "cut_memory_mib": [m / 2**20 for m in w.cut_memory_bytes],
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2))
    print(f"wrote {args.out}")


def w_cut(workload, index):
    return jnp.asarray(workload.cuts)[index].astype(jnp.float32)


if __name__ == "__main__":
    main()
