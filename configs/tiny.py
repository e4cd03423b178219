"""Tiny experiment for tests and smoke runs (seconds on a CPU).

    python -m sflam_jax.main --config configs/tiny.py --workdir /tmp/tiny \
        --config.data.idx_dir=/path/to/idx/files

The "tiny" ViT (2 blocks, width 32), 8 clients with 3 per round, 3 rounds, float matmuls.
"""

import ml_collections

from sflam_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.num_rounds = 3
    c.eval_every = 1
    c.data.num_clients = 8
    c.model.preset = "tiny"
    c.model.cut_layer = 1
    c.aqt.enabled = False
    c.train.clients_per_round = 3
    c.train.batch_size = 8
    c.train.eval_batch_size = 40
    c.ftte.concurrency = 4  # the asynchronous protocols' busy clients (of 8) and buffer
    c.ftte.buffer_size = 2
    c.checkpoint.every = 1
    c.metrics.progress = False
    return c
