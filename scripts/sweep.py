"""Grid sweeps: vectorized training of many configs, or the system model alone at any scale.

    python scripts/sweep.py --config configs/tiny.py --out /tmp/sweep \
        --grid optimizer.learning_rate=0.05,0.1 --grid seed=0,1,2 --grid model.cut_layer=1,2

trains 12 points in 2 compiled programs (the learning rates and seeds of a cut layer are one
vmapped program; see ``sflam_jax.sweep.VECTOR_FIELDS``) and writes ``<out>/<point>/metrics.jsonl``
for each, as a single run of that point would, plus ``<out>/sweep.json``. A field given one value
is a plain override (``--grid num_rounds=20``).

    python scripts/sweep.py --config configs/default.py --out /tmp/system --system-only \
        --draws 16 --grid train.clients_per_round=10,1000,100000,1000000 \
        --grid data.num_clients=1000000 --grid wireless.p_max_w=0.1,0.2

evaluates only the system model (round latency and energy, no training) and writes
``<out>/system.json`` and ``<out>/system.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import runpy
import sys
import time

from sflam_jax import sweep
from sflam_jax.errors import SflamError
from sflam_jax.metrics import atomic_write_text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--grid", action="append", default=[], help="field=value1,value2,... (repeatable)"
    )
    parser.add_argument("--system-only", action="store_true", help="no training; system model")
    parser.add_argument("--draws", type=int, default=16, help="channel draws per system point")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    try:
        base = runpy.run_path(args.config)["get_config"]()
        grid = sweep.parse_grid(args.grid, base)
        os.makedirs(args.out, exist_ok=True)
        t0 = time.perf_counter()
        if args.system_only:
            rows = sweep.system_sweep(base, grid, args.draws)
            atomic_write_text(os.path.join(args.out, "system.json"), json.dumps(rows, indent=2))
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(os.path.join(args.out, "system.csv"), text.getvalue())
            for row in rows:
                print(
                    f"S={row['clients_per_round']:>9,} "
                    + " ".join(f"{k}={row[k]}" for k in grid if k != "train.clients_per_round")
                    + f"  T_round {row['round_latency_s_mean']:.4g} s"
                    + f"  E_round {row['round_energy_j_mean']:.4g} J"
                )
        else:
            index = sweep.run_sweep(base, grid, args.out, progress=not args.quiet)
            for entry in index:
                last = entry["last"] or {}
                status = (
                    "non-finite (see error.txt)"
                    if entry["error"]
                    else (f"test_accuracy {last.get('test_accuracy', float('nan')):.4f}")
                )
                print(f"{entry['directory']}: {status}")
        print(f"done in {time.perf_counter() - t0:.1f} s -> {args.out}")
    except SflamError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
