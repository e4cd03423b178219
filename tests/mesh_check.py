"""Runs rounds of the tiny config on each requested mesh and saves the states (test_sharding).

    python tests/mesh_check.py DEVICES OUT.npz IDX_DIR TFDS_DIR MESH [MESH ...]

DEVICES fake CPU devices are made before jax is imported. A MESH is ``CLIENTSxMODEL`` (1x1: one
device) with an optional ``+stream`` (the host-streamed round). For each mesh the script saves
the final state's leaves as ``<mesh>/<path>`` and the round metrics as
``<mesh>/metrics/<name>``, and prints one JSON line per mesh with the sharding spec and
per-device shard shape of every server parameter.
"""

import dataclasses
import json
import os
import sys

devices, out, idx_dir, tfds_dir, *meshes = sys.argv[1:]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tiny  # noqa: E402

from sflam_jax import experiment, sharding  # noqa: E402

ROUNDS = 2


def config(mesh: str):
    shape, _, mode = mesh.partition("+")
    clients, model = (int(v) for v in shape.split("x"))
    c = tiny.get_config()
    c.data.idx_dir = idx_dir
    c.data.data_dir = tfds_dir
    c.data.num_clients = 16
    c.train.clients_per_round = 8
    c.train.chunk_size = 8
    c.train.chunks_per_block = 1
    c.train.stream = mode == "stream"
    c.quant.up_bits = 4  # the stochastic cut-layer quantizer, with its keys, on every mesh
    c.sharding.clients = clients
    c.sharding.model = model
    return c


saved = {}
base = experiment.build_experiment(config(meshes[0]))  # data, model and initial state, built once
for mesh in meshes:
    cfg = config(mesh)
    layout = sharding.Layout.from_config(cfg.sharding)
    shardings = layout.state_shardings(base.initial)
    state = layout.place(base.initial, shardings)
    engine = dataclasses.replace(base.engine, layout=layout)
    round_fn = experiment.make_round(cfg, engine, shardings, base.dataset, base.parts)
    records = []
    for r in range(ROUNDS):
        state, metrics = round_fn(state, r)
        records.append(jax.device_get(metrics))
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        saved[f"{mesh}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    for name in ("train_loss", "train_accuracy", "samples", "clients"):
        saved[f"{mesh}/metrics/{name}"] = np.stack([np.asarray(m[name]) for m in records])
    layout_size = layout.mesh.devices.size
    placed = {
        jax.tree_util.keystr(path): {
            "spec": [a if a is None else str(a) for a in leaf.sharding.spec],
            "shard": list(leaf.addressable_shards[0].data.shape),
            "shape": list(leaf.shape),
        }
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params_s)[0]
    }
    print(json.dumps({"mesh": mesh, "devices": layout_size, **placed}))
np.savez(out, **saved)
