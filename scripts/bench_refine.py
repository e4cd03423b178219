"""Integer bits of pgd and bcd against the integer optimum, with and without the refinement.

    python scripts/bench_refine.py [--exhaustive 3 4] [--local 8 16] [--instances 10]
        [--out results/bench/refine_cpu.json]

Fresh random instances (default system constants and workload, random steps, Dirichlet(1) data
weights, random w_T in [0.1, 0.9], a learning budget of about 7 bits on average). The reference is
the exhaustive search over integer bits with every candidate solved exactly (float64) for the
``--exhaustive`` sizes, and a float64 local search (single lowerings and one-down-one-up
exchanges, from the smallest uniform bits) for the ``--local`` sizes. Reports each solver's gap
to the reference without the refinement (``RefineOptions(sweeps=0)``: pgd rounds its relaxed bits
up, bcd keeps uniform bits) and with it (the default), and the solve times after compilation.
Prints a markdown table and writes JSON naming the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import benchlib
import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax import quant
from sflam_jax.allocation import bcd, exact, pgd
from sflam_jax.allocation import problem as pb
from sflam_jax.allocation.refine import RefineOptions
from sflam_jax.metrics import atomic_write_text
from sflam_jax.wireless import channel, costs

PARAMS = channel.SystemParams()
WORK = costs.Workload(
    client_flops=1.1e5, server_flops=5.0e6, values_per_sample=17 * 64, client_params=4224,
    batch_size=32,
)  # fmt: skip
EPS_Q = float(quant.error_proxy(6.7, WORK.values_per_sample, 10.0))
OFF = RefineOptions(sweeps=0)


def instances(key, num, s):
    def one(k):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        devices = channel.draw_devices(k1, s, PARAMS)
        steps = jax.random.randint(k2, (s,), 1, 100).astype(jnp.float32)
        rho = jax.random.dirichlet(k3, jnp.ones(s))
        problem = pb.make_problem(devices, steps, rho, WORK, PARAMS, pb.Weights(eps_q=EPS_Q))
        w_t = jax.random.uniform(k4, minval=0.1, maxval=0.9)
        return problem.replace(w_t=w_t, w_e=1.0 - w_t)

    return jax.jit(jax.vmap(one))(jax.random.split(key, num))


SOLVERS = {
    "pgd": lambda p: pgd.allocate(p),
    "pgd_rounded": lambda p: pgd.allocate(
        p, options=dataclasses.replace(pgd.PGDOptions(), refine=OFF)
    ),
    "bcd": lambda p: bcd.allocate(p),
    "bcd_uniform": lambda p: bcd.allocate(p, refine=OFF),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exhaustive", type=int, nargs="*", default=[3, 4])
    parser.add_argument("--local", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--out", default="results/bench/refine_cpu.json")
    args = parser.parse_args()

    rows = []
    for s in [*args.exhaustive, *args.local]:
        batch = instances(jax.random.key(500 + s), args.instances, s)
        solved = {}
        for name, solver in SOLVERS.items():
            run = jax.jit(jax.vmap(solver))
            jax.block_until_ready(run(batch))
            t0 = time.perf_counter()
            _, diag = jax.block_until_ready(run(batch))
            solved[name] = (np.asarray(diag["objective"]), time.perf_counter() - t0)
        search = exact.allocate_bits_search if s in args.exhaustive else None
        reference = []
        for i in range(args.instances):
            problem = jax.tree.map(lambda x, i=i: x[i], batch)
            if search is not None:
                _, diag = search(problem)
            else:
                _, diag = exact.local_bit_search(problem, pb.smallest_bits(problem))
            reference.append(float(diag["objective"]))
        reference = np.asarray(reference)
        row = {"S": s, "reference": "exhaustive" if search else "local search (float64)"}
        for name, (values, seconds) in solved.items():
            gap = values / reference - 1
            row[name] = {
                "max_gap": float(gap.max()),
                "mean_gap": float(gap.mean()),
                "within_half_percent": int(np.sum(gap <= 0.005)),
                "at_reference": int(np.sum(gap <= 1e-4)),
                "seconds_per_instance": seconds / args.instances,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\n| S | reference | " + " | ".join(f"{n} max gap" for n in SOLVERS) + " |")
    print("|---|---|" + "---|" * len(SOLVERS))
    for r in rows:
        gaps = " | ".join(f"{100 * r[n]['max_gap']:.2f}%" for n in SOLVERS)
        print(f"| {r['S']} | {r['reference']} | {gaps} |")
    out = {**benchlib.describe(), "instances": args.instances, "eps_q": EPS_Q, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
