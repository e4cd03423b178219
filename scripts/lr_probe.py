"""Centralised fine-tuning probe: which optimizer settings a config's model tolerates.

    python scripts/lr_probe.py --config configs/fmnist_dinov2_s14.py \
        --settings sgd:0.01,sgd:0.003,adam:1e-4,adam:3e-5 [--head-lr-scale 1,30] [--steps 200] \
        [--out probe.json]

For each ``optimizer:learning_rate`` the whole (unsplit, float) model of the config, from its
initial parameters (the pretrained checkpoint when the config has one), takes ``--steps`` steps
on IID batches of ``train.batch_size`` training images drawn with a fixed seed, with the config's
momentum and weight decay, for each ``--head-lr-scale`` (``optimizer.head_lr_scale``); then
the test accuracy on ``--test`` test images. No federation, no quantization: a quick check of
the learning rate before a federated run (a setting that fails here is unlikely to do well
there). Prints one line per setting and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import time

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
import optax


def probe(config, name: str, learning_rate: float, steps: int, test: int, head: float) -> dict:
    from sflam_jax import experiment
    from sflam_jax.algorithms.base import make_optimizer
    from sflam_jax.data.datasets import load_dataset
    from sflam_jax.models import vit

    dataset = load_dataset(config.data)
    model_cfg, _, params, preprocess = experiment.build_model(config, dataset, jax.random.key(0))
    net = vit.ViT(model_cfg)
    opt_cfg = config.optimizer.copy_and_resolve_references()
    opt_cfg.name = name
    opt_cfg.head_lr_scale = head
    tx = make_optimizer(opt_cfg, learning_rate)

    def loss_fn(p, x, y):
        logits = net.apply({"params": p}, preprocess(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    predict = jax.jit(lambda p, x: net.apply({"params": p}, preprocess(x)).argmax(-1))
    rng = np.random.default_rng(config.seed)
    state = tx.init(params)
    n, batch = len(dataset.train_labels), config.train.batch_size
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        rows = rng.integers(0, n, batch)
        x, y = jnp.asarray(dataset.train_images[rows]), jnp.asarray(dataset.train_labels[rows])
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    hits = 0
    for i in range(0, test, 250):
        x = jnp.asarray(dataset.test_images[i : min(i + 250, test)])
        hits += int((np.asarray(predict(params, x)) == dataset.test_labels[i : i + len(x)]).sum())
    return {
        "optimizer": name,
        "learning_rate": learning_rate,
        "head_lr_scale": head,
        "steps": steps,
        "last_10_train_loss": float(np.mean(losses[-10:])),
        "test_accuracy": hits / test,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--settings", required=True, help="optimizer:lr,... (sgd:0.01,adam:3e-5)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--test", type=int, default=1000, help="test images to score")
    parser.add_argument("--head-lr-scale", default="1", help="optimizer.head_lr_scale values")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    config = runpy.run_path(args.config)["get_config"]()
    rows = []
    for head in args.head_lr_scale.split(","):
        for setting in args.settings.split(","):
            name, lr = setting.split(":")
            row = probe(config, name, float(lr), args.steps, args.test, float(head))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        record = {
            "config": os.path.basename(args.config),
            "machine": benchlib.machine(),
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
