"""Default experiment: SFLAM on Fashion-MNIST with a small ViT, 8-bit cut-layer traffic.

    python -m sflam_jax.main --config configs/default.py --workdir runs/default

K = 50 clients with a Dirichlet(0.5) non-IID split, S = 10 per round, one local epoch, SGD with
momentum, the paper's cut (the device holds the patch embedding, cut_layer = 0) with AQT int8
forward and backward matmuls on the device segment and float on the server.
Reference machine (2 CPU cores): see the README for the measured time and accuracy curve.
"""

import ml_collections

from sflam_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    return base_config()
