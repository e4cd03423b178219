"""The experiment config's defaults: every file in configs/ starts from ``base_config()`` and
overrides a few fields.

A default is written once: the wireless constants come from ``wireless.channel.SystemParams``,
the allocation weights from ``allocation.problem.Weights``, a protocol's own block from its module.
Validation lives in ``sflam_jax.validation``, the rules for resuming a checkpoint under another
config in ``sflam_jax.checkpoint``, the conversion of blocks into library objects in
``sflam_jax.experiment``.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from sflam_jax import quant
from sflam_jax.algorithms import registry
from sflam_jax.allocation.pgd import PGDOptions
from sflam_jax.allocation.problem import Weights
from sflam_jax.data.datasets import DEBIAN_FASHION_MNIST
from sflam_jax.wireless.channel import SystemParams


def base_config() -> ml_collections.ConfigDict:
    """SFLAM on Fashion-MNIST (Debian's dataset-fashion-mnist files) with the "mini" ViT."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.algorithm = "sflam"  # a protocol of algorithms.registry (docs/protocols.md)
    c.num_rounds = 80
    c.eval_every = 5
    c.eval_from = 0  # no test metrics before this round (the last round is always evaluated)

    c.data = ml_collections.ConfigDict()
    c.data.source = "idx"  # "idx": a directory of MNIST-layout IDX files; "tfds": data.name
    c.data.idx_dir = DEBIAN_FASHION_MNIST
    c.data.name = "fashion_mnist"  # TFDS name, used when source == "tfds"
    c.data.data_dir = ""  # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.download = False  # let TFDS download when the dataset is not prepared
    c.data.num_clients = 50  # K
    c.data.partition = "dirichlet"  # or "iid"
    c.data.alpha = 0.5  # Dirichlet concentration of the non-IID split
    c.data.min_client_samples = 1
    c.data.image_size = 0  # model input size in px; 0 = the data's own size
    c.data.mean = (0.5,)  # per-channel normalisation on the [0, 1] scale
    c.data.std = (0.5,)
    c.data.test_samples = 0  # test metrics on the first N test images; 0 = all of them

    c.model = ml_collections.ConfigDict()
    c.model.preset = "mini"  # one of models.vit.PRESETS (ignored with model.pretrained)
    # Hugging Face ViT or DINOv2 checkpoint (hub id or local directory); "" = random init from
    # the preset. Its architecture, image size and normalisation replace preset, patch_size and
    # data.mean/std (docs/pretrained.md).
    c.model.pretrained = ""
    # With model.pretrained: its architecture and normalisation, but random weights (the
    # from-scratch baseline of a fine-tuning run).
    c.model.random_init = False
    c.model.patch_size = 0  # 0 = the preset's
    c.model.cut_layer = 0  # blocks on the device; 0 = embedding only (the paper's code)
    c.model.layer_norm_eps = 1e-6

    c.aqt = ml_collections.ConfigDict()
    c.aqt.enabled = True  # AQT integer matmuls (on a CPU they are emulated, see docs/results.md)
    c.aqt.client = True  # quantize the device segment's matmuls
    c.aqt.server = False  # quantize the server segment's matmuls
    c.aqt.fwd_bits = 8  # 0 = float forward
    c.aqt.bwd_bits = 8  # 0 = float backward

    # Low-rank adapters (docs/lora.md): rank 0 = off (every weight of a segment trains).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the adapter's output is scaled by alpha / rank
    c.lora.targets = "attention"  # "attention", "mlp", "all", or a regex over layer paths
    c.lora.segments = "both"  # which segments carry adapters: "device", "server", "both"
    c.lora.base_bits = 0  # the frozen base of an adapted segment: 0 = float, 8 = int8, 4 = NF4
    c.lora.aggregation = "fedavg"  # "fedavg" (A and B averaged) or "ffa" (A frozen, B averaged)
    # A segment without adapters (lora.segments, or no targeted layer in it): "freeze" (only a
    # head in it trains; its base is stored at base_bits too) or "train" (every weight trains).
    c.lora.unadapted = "freeze"

    c.quant = ml_collections.ConfigDict()
    c.quant.up_bits = 8  # cut-layer uplink bits (32 = float32)
    c.quant.down_bits = quant.FLOAT_BITS  # downlink gradient bits (32 = float32)

    c.train = ml_collections.ConfigDict()
    c.train.clients_per_round = 10  # S
    c.train.local_epochs = 1  # E
    c.train.batch_size = 32  # B
    # Clients vmapped side by side (lanes, or the chunk width); 0 = chosen from the partition
    # (lanes, see min_useful_share) or all S (chunks).
    c.train.chunk_size = 0
    # "lanes": each lane takes its next client when one finishes (longest first), so lanes stay
    # busy when clients' step counts differ; "chunks": fixed chunks, each run to its longest client.
    c.train.schedule = "lanes"
    # With lanes and chunk_size = 0: the most lanes that keep this share of the computed client
    # steps useful (estimated from the partition's client sizes).
    c.train.min_useful_share = 0.95
    # Keep the clients' samples on the host and stream them to the devices chunks_per_block chunks
    # at a time (large populations; always on with several processes).
    c.train.stream = False
    c.train.chunks_per_block = 8
    c.train.eval_batch_size = 500

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # "sgd", "adam", "adamw"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 0.0
    # The classifier's learning rate as a multiple of learning_rate (fine-tuning a new head on a
    # pretrained body); 1 = one optimizer for every parameter.
    c.optimizer.head_lr_scale = 1.0

    # SPEC section 3, SI units; the defaults and their meaning: wireless.channel.SystemParams.
    c.wireless = ml_collections.ConfigDict(dataclasses.asdict(SystemParams()))

    c.allocation = ml_collections.ConfigDict()  # SPEC section 4
    # "pgd", "bcd", "equal" (full power, equal bandwidth), "max_power" (same, largest bits)
    c.allocation.method = "equal"
    c.allocation.optimize_bits = False  # let the solver pick bits; False: quant.up_bits for all
    # Objective weights (w_t > 0, w_t + w_e = 1), bit range, learning budget on
    # sum_k rho_k delta(b_k) and the assumed value range in delta(b): allocation.problem.Weights.
    weights = Weights()
    for name in ("w_t", "w_e", "bits_min", "bits_max", "eps_q", "value_range"):
        c.allocation[name] = getattr(weights, name)
    c.allocation.pgd_steps = PGDOptions().steps

    c.sharding = ml_collections.ConfigDict()  # see sflam_jax/sharding.py
    c.sharding.clients = 0  # devices on the mesh's "clients" axis; 0 = all not on "model"
    c.sharding.model = 1  # devices on the "model" axis (server segment split by the rules)
    # (logical axis of models.vit.logical_axes, mesh axis or None); unnamed axes are replicated.
    c.sharding.rules = (("heads", "model"), ("mlp", "model"))
    # CPU backend only: XLA devices to split the host into (0 = JAX's default, one), so that a
    # chunk's clients train on the cores side by side; set before JAX starts (the CLI does).
    c.sharding.cpu_devices = 0

    c.distributed = ml_collections.ConfigDict()  # jax.distributed, for several processes
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""  # "host:port"; "" = from the cluster / environment
    c.distributed.num_processes = 0  # 0 = from the cluster / environment
    c.distributed.process_id = -1  # -1 = from the cluster / environment
    c.distributed.cpu_collectives = "gloo"  # CPU backend only

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 5  # rounds between checkpoints (the last round is always saved)
    c.checkpoint.max_to_keep = 2

    c.metrics = ml_collections.ConfigDict()
    c.metrics.tensorboard = False  # also write TensorBoard event files (needs tensorboardX)
    c.metrics.progress = True  # progress bar on stderr

    # Each protocol's own fields, under its name.
    for protocol in registry.PROTOCOLS.values():
        if protocol.config_block is not None:
            c[protocol.name] = protocol.config_block()
    return c


def flatten(cfg) -> dict:
    """``{"train.batch_size": 32, ...}``: every leaf field of a config by its dotted name."""
    flat = {}
    for name, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            flat.update({f"{name}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[name] = value
    return flat


def get(cfg, field: str):
    node = cfg
    for part in field.split("."):
        node = node[part]
    return node
