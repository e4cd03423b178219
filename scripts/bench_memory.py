"""Peak memory of one training round against the number of clients per round S.

    python scripts/bench_memory.py [--out results/bench/memory_cpu.json] [--sizes 16,256,1000,10000]

The tiny config on the real Fashion-MNIST files with K = 10,000 clients (6 samples each, IID),
batch 6, one local step per client. Each point runs in a fresh process (``--one``) and reports
that process's peak resident memory (on the CPU backend device buffers are host memory, so this
is the whole round), the build time and the round's time. Three ways to run the round, side by
side in one run:

- ``streamed``: chunks of 16 clients, samples streamed from the host 4 chunks per call
  (``train.stream``);
- ``resident``: chunks of 16 clients, every training image on the device (the default);
- ``unchunked``: all S clients vmapped at once (``train.chunk_size = 0``), up to
  ``--max-unchunked``.

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import benchlib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODES = ("streamed", "resident", "unchunked")
NUM_CLIENTS = 10_000
CHUNK = 16


def config(mode: str, clients_per_round: int):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny

    c = tiny.get_config()
    c.data.idx_dir = tiny.base_config().data.idx_dir  # the real Fashion-MNIST files
    c.data.num_clients = NUM_CLIENTS
    c.data.partition = "iid"
    c.train.batch_size = 6
    c.train.clients_per_round = clients_per_round
    c.train.chunk_size = 0 if mode == "unchunked" else min(CHUNK, clients_per_round)
    # "unchunked": every sampled client vmapped at once (one chunk of all S).
    c.train.schedule = "chunks" if mode == "unchunked" else "lanes"
    c.train.stream = mode == "streamed"
    c.train.chunks_per_block = 4
    return c


def one(mode: str, clients_per_round: int) -> dict:
    """Builds the run and trains one round in this process; returns the measurements."""
    import jax

    from sflam_jax import experiment

    t0 = time.perf_counter()
    run = experiment.build_run(config(mode, clients_per_round))
    t1 = time.perf_counter()
    state, metrics = run.round_fn(run.initial, 0)
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    return {
        "mode": mode,
        "clients_per_round": clients_per_round,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "build_s": t1 - t0,
        "round_s": t2 - t1,
        "samples": float(metrics["samples"]),
        "train_loss": float(metrics["train_loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench", "memory_cpu.json"))
    parser.add_argument("--sizes", default="16,64,256,1000,10000")
    parser.add_argument("--max-unchunked", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for s in sizes:
        for mode in MODES:
            if mode == "unchunked" and s > args.max_unchunked:
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--one", mode, str(s)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": ROOT},
            )
            if proc.returncode:
                rows.append({"mode": mode, "clients_per_round": s, "error": proc.stderr[-400:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)

    from sflam_jax.metrics import atomic_write_text

    result = {
        **benchlib.describe(),
        "num_clients": NUM_CLIENTS,
        "chunk_size": CHUNK,
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(table(rows))


def table(rows) -> str:
    """Markdown: one line per S, peak MiB and round seconds of each mode."""
    by = {(r["mode"], r["clients_per_round"]): r for r in rows}
    lines = [
        "| S | " + " | ".join(f"{m} peak MiB | {m} round s" for m in MODES) + " |",
        "|---:|" + "---:|" * (2 * len(MODES)),
    ]
    for s in sorted({r["clients_per_round"] for r in rows}):
        cells = []
        for m in MODES:
            r = by.get((m, s))
            if r is None or "error" in r:
                cells += ["failed" if r else "-", "-"]
            else:
                cells += [f"{r['peak_rss_mib']:.0f}", f"{r['round_s']:.1f}"]
        lines.append(f"| {s:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
