"""The paper's setting: ViT-B/32 at 224 px on CIFAR-10, fine-tuned from ImageNet-21k weights.

    python -m sflam_jax.main --config configs/cifar10_vit_b32.py --workdir runs/cifar10_b32 \
        --config.data.data_dir=/path/to/tensorflow_datasets

The weights are the Hugging Face checkpoint google/vit-base-patch32-224-in21k (downloaded once into
the hub cache; or point --config.model.pretrained at a local copy); it brings the architecture,
224 px inputs and its normalisation, and a new 10-class head starts at zero.

K = 50 clients (Dirichlet 0.5), S = 10 per round, 5 local epochs, batch 128, SGD lr 0.01 with
momentum 0.9, 8-bit cut-layer traffic, the device holding the patch embedding (cut_layer = 0).
CIFAR-10 must be prepared as array_record in data.data_dir (or set data.download=True on a machine
with internet). Images are resized from 32 to 224 px inside the jitted round.
Expected: hours per 100 rounds on one GPU; not runnable on the 2-core reference CPU.
Round 0 in metrics.jsonl is the pretrained features with the zero head (chance accuracy).
"""

import ml_collections

from sflam_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.num_rounds = 100
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.image_size = 224
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.model.preset = "b32"  # the checkpoint's architecture (used when pretrained is "")
    c.model.pretrained = "google/vit-base-patch32-224-in21k"
    c.train.local_epochs = 5
    c.train.batch_size = 128
    c.train.eval_batch_size = 250
    c.optimizer.learning_rate = 0.01
    c.optimizer.momentum = 0.9
    return c
