"""Config validation: ``validate`` runs once at start-up and raises ``ConfigError`` (a
``ValueError``) naming the field, the value and what is allowed; fields that ``base_config`` does
not have are rejected with the nearest known name. ``validate_data`` and ``validate_partition``
check the rules that need the data.
"""

from __future__ import annotations

import difflib
import re

import ml_collections

from sflam_jax import fields
from sflam_jax.algorithms import registry
from sflam_jax.algorithms.base import OPTIMIZERS
from sflam_jax.allocation.problem import Weights
from sflam_jax.config import base_config, flatten, get
from sflam_jax.engine import SCHEDULES
from sflam_jax.errors import ConfigError
from sflam_jax.models.lora import TARGET_PRESETS
from sflam_jax.models.vit import PRESETS


def check_known_fields(cfg: ml_collections.ConfigDict) -> None:
    """Rejects fields that ``base_config`` lacks (a typo would otherwise be silently ignored)."""
    known = flatten(base_config())
    for field in flatten(cfg):
        if field not in known:
            close = difflib.get_close_matches(field, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{field!r} is not a config field{hint}")
    for field in known:
        try:
            get(cfg, field)
        except (KeyError, AttributeError):
            raise ConfigError(
                f"the config has no field {field!r}; start from base_config()"
            ) from None


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks every field's type and range and the cross-field rules.

    Raises:
      ConfigError: the first bad field, with its value and the allowed range.
    """
    check_known_fields(cfg)
    fields.integer(cfg, "seed", 0)
    protocol = registry.get(cfg.algorithm)
    fields.integer(cfg, "num_rounds", 1)
    fields.integer(cfg, "eval_every", 0)
    fields.integer(cfg, "eval_from", 0)
    fields.choice(cfg, "data.source", ("idx", "tfds"))
    fields.integer(cfg, "data.num_clients", 1)
    fields.choice(cfg, "data.partition", ("dirichlet", "iid"))
    fields.positive(cfg, "data.alpha")
    fields.integer(cfg, "data.min_client_samples", 0)
    fields.integer(cfg, "data.image_size", 0)
    fields.integer(cfg, "data.test_samples", 0)
    if len(cfg.data.mean) != len(cfg.data.std):
        fields.fail("data.std", cfg.data.std, f"needs as many entries as data.mean={cfg.data.mean}")
    if any(s <= 0 for s in cfg.data.std):
        fields.fail("data.std", cfg.data.std, "every entry must be > 0")
    fields.choice(cfg, "model.preset", tuple(PRESETS))
    fields.integer(cfg, "model.patch_size", 0)
    # A checkpoint's depth is known once it is read (train.build_model checks it there).
    depth = None if cfg.model.pretrained else PRESETS[cfg.model.preset][1]
    fields.integer(cfg, "model.cut_layer", 0, depth)
    fields.positive(cfg, "model.layer_norm_eps")
    if cfg.model.random_init and not cfg.model.pretrained:
        fields.fail(
            "model.random_init", True, "needs model.pretrained (the architecture to initialise)"
        )
    for side in ("fwd_bits", "bwd_bits"):
        fields.integer(cfg, f"aqt.{side}", 0, 16)
        if 0 < cfg.aqt[side] < 2:
            fields.fail(f"aqt.{side}", cfg.aqt[side], "must be 0 (float) or in [2, 16]")
    validate_lora(cfg, protocol)
    fields.integer(cfg, "quant.up_bits", 1, 32)
    fields.integer(cfg, "quant.down_bits", 1, 32)
    fields.integer(cfg, "train.clients_per_round", 1)
    if cfg.train.clients_per_round > cfg.data.num_clients:
        fields.fail(
            "train.clients_per_round",
            cfg.train.clients_per_round,
            f"must be <= data.num_clients={cfg.data.num_clients}",
        )
    fields.integer(cfg, "train.local_epochs", 1)
    fields.integer(cfg, "train.batch_size", 1)
    fields.integer(cfg, "train.chunk_size", 0)
    if cfg.train.chunk_size > cfg.train.clients_per_round:
        fields.fail(
            "train.chunk_size",
            cfg.train.chunk_size,
            f"must be <= train.clients_per_round={cfg.train.clients_per_round} (0 = chosen "
            "from the partition with lanes, all at once with chunks)",
        )
    fields.choice(cfg, "train.schedule", SCHEDULES)
    if not 0 < cfg.train.min_useful_share <= 1:
        fields.fail("train.min_useful_share", cfg.train.min_useful_share, "must be in (0, 1]")
    fields.integer(cfg, "train.eval_batch_size", 1)
    fields.integer(cfg, "train.chunks_per_block", 1)
    if (cfg.train.stream or cfg.distributed.enabled) and not protocol.streamable:
        streamable = [p.name for p in registry.PROTOCOLS.values() if p.streamable]
        fields.fail(
            "algorithm",
            cfg.algorithm,
            "train.stream and distributed runs need a protocol whose clients train side by side "
            f"({', '.join(map(repr, streamable))}); {cfg.algorithm!r} serves its clients one "
            "after another",
        )
    fields.integer(cfg, "sharding.clients", 0)
    fields.integer(cfg, "sharding.model", 1)
    fields.integer(cfg, "sharding.cpu_devices", 0)
    for rule in cfg.sharding.rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            fields.fail(
                "sharding.rules", cfg.sharding.rules, "must be (logical axis, mesh axis) pairs"
            )
        if rule[1] not in ("clients", "model", None, ""):
            fields.fail(
                "sharding.rules", cfg.sharding.rules, "mesh axes are 'model', 'clients' or None"
            )
    fields.integer(cfg, "distributed.num_processes", 0)
    fields.integer(cfg, "distributed.process_id", -1)
    fields.choice(cfg, "distributed.cpu_collectives", ("gloo", "mpi"))
    fields.choice(cfg, "optimizer.name", OPTIMIZERS)
    fields.positive(cfg, "optimizer.learning_rate")
    fields.positive(cfg, "optimizer.head_lr_scale")
    if not 0 <= cfg.optimizer.momentum < 1:
        fields.fail("optimizer.momentum", cfg.optimizer.momentum, "must be in [0, 1)")
    if cfg.optimizer.weight_decay < 0:
        fields.fail("optimizer.weight_decay", cfg.optimizer.weight_decay, "must be >= 0")
    for name in (
        "radius_m",
        "bandwidth_hz",
        "p_max_w",
        "server_power_w",
        "cpu_min_hz",
        "cpu_max_hz",
        "flops_per_cycle",
        "kappa",
        "server_flops",
    ):
        fields.positive(cfg, f"wireless.{name}")
    if not 0 <= cfg.wireless.min_distance_m < cfg.wireless.radius_m:
        fields.fail(
            "wireless.min_distance_m",
            cfg.wireless.min_distance_m,
            f"must be in [0, wireless.radius_m={cfg.wireless.radius_m})",
        )
    if cfg.wireless.cpu_min_hz > cfg.wireless.cpu_max_hz:
        fields.fail(
            "wireless.cpu_min_hz", cfg.wireless.cpu_min_hz, "must be <= wireless.cpu_max_hz"
        )
    if cfg.wireless.shadowing_std_db < 0:
        fields.fail("wireless.shadowing_std_db", cfg.wireless.shadowing_std_db, "must be >= 0")
    fields.choice(cfg, "allocation.method", protocol.allocators)
    # The bit range and the weights are checked where they are used (allocation.problem.Weights).
    fields.integer(cfg, "allocation.bits_min")
    fields.integer(cfg, "allocation.bits_max")
    fields.positive(cfg, "allocation.value_range")
    fields.integer(cfg, "allocation.pgd_steps", 1)
    try:
        Weights.from_config(cfg.allocation, protocol.cut_bits(cfg.quant)[1])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if protocol.validate is not None:
        protocol.validate(cfg)
    fields.integer(cfg, "checkpoint.every", 1)
    fields.integer(cfg, "checkpoint.max_to_keep", 1)


def validate_data(
    cfg: ml_collections.ConfigDict, image_shape, train_size: int, test_size: int | None = None
) -> None:
    """The rules that need the data: channels, patch size, enough samples per client and for
    ``data.test_samples``."""
    channels = image_shape[-1]
    if len(cfg.data.mean) not in (1, channels):
        fields.fail(
            "data.mean", cfg.data.mean, f"needs 1 or {channels} entries (the data's channels)"
        )
    size = cfg.data.image_size or image_shape[0]
    patch = cfg.model.patch_size or PRESETS[cfg.model.preset][4]
    if not cfg.model.pretrained and size % patch:
        fields.fail("model.patch_size", patch, f"must divide the image size {size}")
    if cfg.data.num_clients * cfg.data.min_client_samples > train_size:
        fields.fail(
            "data.num_clients",
            cfg.data.num_clients,
            f"times data.min_client_samples={cfg.data.min_client_samples} exceeds the "
            f"{train_size} training samples",
        )
    if test_size is not None and cfg.data.test_samples > test_size:
        fields.fail(
            "data.test_samples", cfg.data.test_samples, f"exceeds the {test_size} test samples"
        )


def validate_partition(cfg: ml_collections.ConfigDict, client_sizes) -> None:
    """The rules that need the partition: a batch must fit in the largest client's data."""
    largest = max(int(n) for n in client_sizes)
    if largest == 0:
        fields.fail("data.num_clients", cfg.data.num_clients, "leaves every client without samples")
    if cfg.train.batch_size > largest:
        fields.fail(
            "train.batch_size",
            cfg.train.batch_size,
            f"exceeds the largest client's {largest} samples (every batch would be padded); "
            "use a smaller batch or fewer clients",
        )


def validate_lora(cfg, protocol) -> None:
    """The ``lora`` block: ranges, choices, a regex that compiles, a protocol that takes
    adapters."""
    rank = fields.integer(cfg, "lora.rank", 0)
    fields.positive(cfg, "lora.alpha")
    fields.choice(cfg, "lora.segments", ("device", "server", "both"))
    fields.choice(cfg, "lora.base_bits", (0, 4, 8))
    fields.choice(cfg, "lora.aggregation", ("fedavg", "ffa"))
    fields.choice(cfg, "lora.unadapted", ("freeze", "train"))
    targets = cfg.lora.targets
    if not isinstance(targets, str) or not targets:
        fields.fail("lora.targets", targets, f"must be one of {sorted(TARGET_PRESETS)} or a regex")
    if targets not in TARGET_PRESETS:
        try:
            re.compile(targets)
        except re.error as e:
            fields.fail("lora.targets", targets, f"is not a valid regex ({e})")
    if rank and not protocol.adapters:
        fields.fail(
            "lora.rank",
            rank,
            f"must be 0 with algorithm={cfg.algorithm!r}: adapters run with "
            f"{', '.join(registry.with_adapters())} so far",
        )
