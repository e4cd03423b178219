"""SFPrompt's device compute and traffic against federated full fine-tuning, from the cost model
alone (no weights, no data): XLA's cost analysis of each piece of the U-shaped ViT.

    python scripts/sfprompt_costs.py [--out results/paper/sfprompt_ratios.json]

For ViT-B/16 and ViT-L/16 at 224 px (10 classes) and one client of ``--samples`` samples: the
device FLOPs of an SFPrompt round (EL2N scoring, local-loss phase, the device's part of the split
phase) over those of one round of full fine-tuning on the device (E epochs of the whole model),
and the bytes on the air (four cut crossings per sample, prompts and tail each way) over the whole
model up and down. Settings vary the front blocks, the keep fraction, the local-loss epochs and
the cut-layer bits. Prints a markdown table and writes JSON (and the table as .md).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODELS = {"ViT-B/16": "b16", "ViT-L/16": "l16"}


def planner(preset: str, head_blocks: int):
    """The SFPrompt round planner of a preset at 224 px with ``head_blocks`` front blocks."""
    from sflam_jax import experiment
    from sflam_jax.config import base_config

    c = base_config()
    c.algorithm, c.model.preset, c.data.image_size = "sfprompt", preset, 224
    c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    c.sfprompt.head_blocks = head_blocks
    return experiment.planner_for(c, (224, 224, 3), 10)


def ratios(plan, samples: int, keep: float, local: int, bits: int) -> dict:
    """One client's SFPrompt round against full fine-tuning (the cost model's ``extra``)."""
    from sflam_jax.wireless.channel import draw_devices

    workload = dataclasses.replace(plan.workload, keep=keep, local_loss_epochs=local)
    devices = draw_devices(jax.random.key(0), 1, plan.params)
    one = jnp.ones((1,))
    extra = plan.cost_model(
        devices,
        one,
        one * plan.params.p_max_w,
        one * plan.params.bandwidth_hz,
        one * bits,
        workload,
        plan.params,
        plan.weights.down_bits,
        counts=jnp.asarray([samples]),
    )["extra"]
    return {
        "device_compute_ratio": float(extra["device_compute_ratio"]),
        "traffic_ratio": float(extra["traffic_ratio"]),
        "device_gflop": float(extra["device_flops"]) / 1e9,
        "fl_device_gflop": float(extra["fl_device_flops"]) / 1e9,
        "air_mib": float(extra["air_bytes"]) / 2**20,
        "fl_air_mib": float(extra["fl_air_bytes"]) / 2**20,
        "trainable_params": workload.trainable_params,
        "full_params": workload.full_params,
    }


def main():
    from sflam_jax.metrics import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500, help="samples of the client")
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "results", "paper", "sfprompt_ratios.json")
    )
    args = parser.parse_args()
    rows = []
    for (name, preset), head in itertools.product(MODELS.items(), (0, 1)):
        plan = planner(preset, head)
        for keep, local, bits in itertools.product((0.5, 1.0), (0, 1), (32, 8)):
            r = ratios(plan, args.samples, keep, local, bits)
            setting = {"head_blocks": head, "keep": keep, "local_epochs": local, "bits": bits}
            rows.append({"model": name, **setting, **r})
            print(json.dumps(rows[-1]), flush=True)
    table = [
        "| model | front blocks | keep | local-loss epochs | cut bits | device compute / FL | "
        "traffic / FL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['head_blocks']} | {r['keep']} | {r['local_epochs']} | "
            f"{r['bits']} | {100 * r['device_compute_ratio']:.2f}% | {r['traffic_ratio']:.3f}x |"
        )
    text = "\n".join(table)
    print(text)
    out = {"samples": args.samples, "rows": rows}
    atomic_write_text(args.out, json.dumps(out, indent=2))
    atomic_write_text(os.path.splitext(args.out)[0] + ".md", text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
