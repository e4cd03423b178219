"""Device and server segment costs of a config's model at every cut layer, from XLA's analyses.

    python scripts/split_costs.py --config configs/fmnist_dinov2_s14.py \
        [--out results/bench/split_costs_dinov2_s14.json]

For each cut ``l`` in ``[0, depth]`` (the device holds the embedding and blocks ``[0, l)``):
forward FLOPs per sample of both segments (XLA's cost analysis of the float segments, as the
allocation's workload), their parameter counts, the training memory of one device (parameters,
gradients and the optimizer's states in float32, plus the temporaries XLA keeps to take one
gradient on a batch: its memory analysis) and of one server copy of the rest, and the cut-layer
values per sample with the uplink bytes per batch at ``quant.up_bits``. Prints a markdown table
and writes JSON (and the table next to it as .md).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

import benchlib
import jax

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def costs(config) -> list[dict]:
    from sflam_jax import experiment
    from sflam_jax.data.datasets import load_dataset
    from sflam_jax.models import split as split_lib
    from sflam_jax.wireless.costs import device_memory_bytes

    dataset = load_dataset(config.data)
    model_cfg, _, params, _ = experiment.build_model(config, dataset, jax.random.key(0))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    image = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    batch = config.train.batch_size
    opt = config.optimizer
    slots = 2 if opt.name in ("adam", "adamw") else int(opt.momentum > 0)
    mib = 2.0**20
    rows = []
    for cut in range(model_cfg.depth + 1):
        model = split_lib.split(model_cfg, cut)
        params_c, params_s = split_lib.split_params(shapes, cut, model_cfg.depth)
        f_c, f_s = split_lib.segment_flops(model, params_c, params_s, image)
        n_c, n_s = split_lib.num_params(params_c), split_lib.num_params(params_s)
        act_c = split_lib.activation_bytes(model.client_apply, params_c, (batch, *image))
        act_s = split_lib.activation_bytes(
            model.server_apply, params_s, (batch, *model.smashed_shape)
        )
        rows.append(
            {
                "cut_layer": cut,
                "device_gflops_per_sample": f_c / 1e9,
                "server_gflops_per_sample": f_s / 1e9,
                "device_params": n_c,
                "server_params": n_s,
                "device_memory_mib": device_memory_bytes(n_c, act_c, slots) / mib,
                "server_copy_memory_mib": device_memory_bytes(n_s, act_s, slots) / mib,
                "cut_values_per_sample": model.values_per_sample,
                "uplink_kib_per_batch": batch
                * model.values_per_sample
                * config.quant.up_bits
                / 8
                / 1024,
            }
        )
        print(f"cut {cut}: done", file=sys.stderr)
    return rows


def table(rows: list[dict], config) -> str:
    lines = [
        f"| cut | device GFLOP/sample | server GFLOP/sample | device params | server params | "
        f"device memory (MiB, batch {config.train.batch_size}) | server copy memory (MiB) | "
        f"uplink KiB/batch ({config.quant.up_bits} bit) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cut_layer']} | {r['device_gflops_per_sample']:.4f} | "
            f"{r['server_gflops_per_sample']:.4f} | {r['device_params']:,} | "
            f"{r['server_params']:,} | {r['device_memory_mib']:.1f} | "
            f"{r['server_copy_memory_mib']:.1f} | {r['uplink_kib_per_batch']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="an experiment config file")
    parser.add_argument("--out", default="", help="JSON file to write (and .md beside it)")
    args = parser.parse_args()
    config = runpy.run_path(args.config)["get_config"]()
    rows = costs(config)
    text = table(rows, config)
    print(text)
    if args.out:
        record = {
            "config": os.path.relpath(os.path.abspath(args.config), ROOT),
            "machine": benchlib.machine(),
            "model": os.path.basename(config.model.pretrained) or config.model.preset,
            "image_size": config.data.image_size,
            "batch_size": config.train.batch_size,
            "optimizer": config.optimizer.name,
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
