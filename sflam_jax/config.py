"""The common experiment config and its validation.

Every file in configs/ starts from ``base_config()`` and overrides a few fields. ``validate`` runs
once at start-up and raises ``ConfigError`` (a ``ValueError``) naming the field, the value and what
is allowed; fields that ``base_config`` does not have are rejected with the nearest known name.
"""

from __future__ import annotations

import difflib
import json

import ml_collections

from sflam_jax.data.datasets import DEBIAN_FASHION_MNIST
from sflam_jax.errors import ConfigError
from sflam_jax.models.vit import PRESETS

# SPEC section 1: SFLAM and the protocols it is compared with (see train.build_algorithm).
ALGORITHMS = ("sflam", "sfl", "sfl_v2", "sl", "fl")

# Fields a resumed run may change: they steer the run (length, logging, checkpoint cadence, where
# the files are) but not the numbers of a round. Every other field must match the checkpoint.
RUN_CONTROL_FIELDS = frozenset(
    {
        "num_rounds",
        "eval_every",
        "data.idx_dir",
        "data.data_dir",
        "data.download",
        "train.eval_batch_size",
        "checkpoint.every",
        "checkpoint.max_to_keep",
        "metrics.tensorboard",
        "metrics.progress",
        # Placement: a run may resume on another mesh or number of processes (the numbers agree
        # to float rounding, the order of FedAvg's sums being the only difference).
        "train.stream",
        "train.chunks_per_block",
        "sharding.clients",
        "sharding.model",
        "sharding.rules",
        "sharding.cpu_devices",
        "distributed.enabled",
        "distributed.coordinator_address",
        "distributed.num_processes",
        "distributed.process_id",
        "distributed.cpu_collectives",
    }
)


def base_config() -> ml_collections.ConfigDict:
    """SFLAM on Fashion-MNIST (Debian's dataset-fashion-mnist files) with the "mini" ViT."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.algorithm = "sflam"  # or a baseline: "sfl", "sfl_v2", "sl", "fl"
    c.num_rounds = 80
    c.eval_every = 5

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

    c.model = ml_collections.ConfigDict()
    c.model.preset = "mini"  # one of models.vit.PRESETS (ignored with model.pretrained)
    # Hugging Face ViT checkpoint (hub id or local directory); "" = random init from the preset.
    # Its architecture, image size and normalisation replace preset, patch_size and data.mean/std.
    c.model.pretrained = ""
    c.model.patch_size = 0  # 0 = the preset's
    c.model.cut_layer = 0  # blocks on the device; 0 = embedding only (the paper's code)
    c.model.layer_norm_eps = 1e-6

    c.aqt = ml_collections.ConfigDict()
    c.aqt.enabled = True  # AQT integer matmuls (on a CPU they are emulated, see README)
    c.aqt.client = True  # quantize the device segment's matmuls
    c.aqt.server = False  # quantize the server segment's matmuls
    c.aqt.fwd_bits = 8  # 0 = float forward
    c.aqt.bwd_bits = 8  # 0 = float backward

    c.quant = ml_collections.ConfigDict()
    c.quant.up_bits = 8  # cut-layer uplink bits (32 = float32)
    c.quant.down_bits = 32  # downlink gradient bits (32 = float32)

    c.train = ml_collections.ConfigDict()
    c.train.clients_per_round = 10  # S
    c.train.local_epochs = 1  # E
    c.train.batch_size = 32  # B
    c.train.chunk_size = 0  # clients vmapped at once; 0 = all S
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

    c.wireless = ml_collections.ConfigDict()  # SPEC section 3; SI units
    c.wireless.radius_m = 250.0  # devices uniform in a disc around the edge server
    c.wireless.min_distance_m = 10.0
    c.wireless.shadowing_std_db = 8.0
    c.wireless.noise_dbm_per_hz = -174.0
    c.wireless.bandwidth_hz = 20e6  # total uplink bandwidth B
    c.wireless.p_max_w = 0.2  # device power limit
    c.wireless.server_power_w = 1.0  # downlink power
    c.wireless.cpu_min_hz = 0.5e9  # device clocks ~ U[min, max]
    c.wireless.cpu_max_hz = 2.0e9
    c.wireless.flops_per_cycle = 16.0
    c.wireless.kappa = 1e-28  # energy per cycle is kappa f^2
    c.wireless.server_flops = 100e12  # edge server FLOP/s, shared by the S copies

    c.allocation = ml_collections.ConfigDict()  # SPEC section 4
    # "pgd", "bcd", "equal" (full power, equal bandwidth), "max_power" (same, largest bits)
    c.allocation.method = "equal"
    c.allocation.optimize_bits = False  # let the solver pick bits; False: quant.up_bits for all
    c.allocation.w_t = 0.5  # weight of T_round / T_ref (> 0)
    c.allocation.w_e = 0.5  # weight of E_round / E_ref; w_t + w_e = 1
    c.allocation.bits_min = 2
    c.allocation.bits_max = 16
    c.allocation.eps_q = 0.5  # budget on sum_k rho_k delta(b_k)
    c.allocation.value_range = 10.0  # assumed max - min of a sample's smashed data in delta(b)
    c.allocation.pgd_steps = 1500

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
    return c


def _fail(field: str, value, allowed: str):
    raise ConfigError(f"{field}={value!r} is invalid: {allowed}")


def flatten(cfg) -> dict:
    """``{"train.batch_size": 32, ...}``: every leaf field of a config by its dotted name."""
    flat = {}
    for name, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            flat.update({f"{name}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[name] = value
    return flat


def to_record(cfg) -> dict:
    """The flattened config as plain JSON values (tuples become lists), as checkpoints store it."""
    return json.loads(json.dumps(flatten(cfg)))


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"field is A there and B here"`` for each field outside ``RUN_CONTROL_FIELDS`` that differs
    between two ``to_record`` dicts (a field missing on one side counts as different)."""
    missing = object()
    out = []
    for field in sorted(set(saved) | set(current)):
        a, b = saved.get(field, missing), current.get(field, missing)
        if field not in RUN_CONTROL_FIELDS and a != b:
            show = lambda v: "absent" if v is missing else repr(v)  # noqa: E731
            out.append(f"{field} is {show(a)} there and {show(b)} here")
    return out


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
            _get(cfg, field)
        except (KeyError, AttributeError):
            raise ConfigError(
                f"the config has no field {field!r}; start from base_config()"
            ) from None


def _int_in(cfg, field: str, lo: int, hi: int | None = None) -> None:
    value = _get(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, value, "must be an integer")
    if value < lo or (hi is not None and value > hi):
        _fail(field, value, f"must be in [{lo}, {'inf' if hi is None else hi}]")


def _positive(cfg, field: str) -> None:
    value = _get(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        _fail(field, value, "must be a number > 0")


def _choice(cfg, field: str, allowed) -> None:
    value = _get(cfg, field)
    if value not in allowed:
        _fail(field, value, f"allowed: {', '.join(map(repr, allowed))}")


def _get(cfg, field: str):
    node = cfg
    for part in field.split("."):
        node = node[part]
    return node


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks every field's type and range and the cross-field rules.

    Raises:
      ConfigError: the first bad field, with its value and the allowed range.
    """
    check_known_fields(cfg)
    _int_in(cfg, "seed", 0)
    _choice(cfg, "algorithm", ALGORITHMS)
    _int_in(cfg, "num_rounds", 1)
    _int_in(cfg, "eval_every", 0)
    _choice(cfg, "data.source", ("idx", "tfds"))
    _int_in(cfg, "data.num_clients", 1)
    _choice(cfg, "data.partition", ("dirichlet", "iid"))
    _positive(cfg, "data.alpha")
    _int_in(cfg, "data.min_client_samples", 0)
    _int_in(cfg, "data.image_size", 0)
    if len(cfg.data.mean) != len(cfg.data.std):
        _fail("data.std", cfg.data.std, f"needs as many entries as data.mean={cfg.data.mean}")
    if any(s <= 0 for s in cfg.data.std):
        _fail("data.std", cfg.data.std, "every entry must be > 0")
    _choice(cfg, "model.preset", tuple(PRESETS))
    _int_in(cfg, "model.patch_size", 0)
    # A checkpoint's depth is known once it is read (train.build_model checks it there).
    depth = None if cfg.model.pretrained else PRESETS[cfg.model.preset][1]
    _int_in(cfg, "model.cut_layer", 0, depth)
    _positive(cfg, "model.layer_norm_eps")
    for side in ("fwd_bits", "bwd_bits"):
        _int_in(cfg, f"aqt.{side}", 0, 16)
        if 0 < cfg.aqt[side] < 2:
            _fail(f"aqt.{side}", cfg.aqt[side], "must be 0 (float) or in [2, 16]")
    _int_in(cfg, "quant.up_bits", 1, 32)
    _int_in(cfg, "quant.down_bits", 1, 32)
    _int_in(cfg, "train.clients_per_round", 1)
    if cfg.train.clients_per_round > cfg.data.num_clients:
        _fail(
            "train.clients_per_round",
            cfg.train.clients_per_round,
            f"must be <= data.num_clients={cfg.data.num_clients}",
        )
    _int_in(cfg, "train.local_epochs", 1)
    _int_in(cfg, "train.batch_size", 1)
    _int_in(cfg, "train.chunk_size", 0)
    if cfg.train.chunk_size > cfg.train.clients_per_round:
        _fail(
            "train.chunk_size",
            cfg.train.chunk_size,
            f"must be <= train.clients_per_round={cfg.train.clients_per_round} (0 = all at once)",
        )
    _int_in(cfg, "train.eval_batch_size", 1)
    _int_in(cfg, "train.chunks_per_block", 1)
    if (cfg.train.stream or cfg.distributed.enabled) and cfg.algorithm in ("sfl_v2", "sl"):
        _fail(
            "algorithm",
            cfg.algorithm,
            "train.stream and distributed runs need an SFL-V1-family protocol "
            "('sflam', 'sfl', 'fl'); SFL-V2 and SL serve their clients one after another",
        )
    _int_in(cfg, "sharding.clients", 0)
    _int_in(cfg, "sharding.model", 1)
    _int_in(cfg, "sharding.cpu_devices", 0)
    for rule in cfg.sharding.rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            _fail("sharding.rules", cfg.sharding.rules, "must be (logical axis, mesh axis) pairs")
        if rule[1] not in ("clients", "model", None, ""):
            _fail("sharding.rules", cfg.sharding.rules, "mesh axes are 'model', 'clients' or None")
    _int_in(cfg, "distributed.num_processes", 0)
    _int_in(cfg, "distributed.process_id", -1)
    _choice(cfg, "distributed.cpu_collectives", ("gloo", "mpi"))
    _choice(cfg, "optimizer.name", ("sgd", "adam", "adamw"))
    _positive(cfg, "optimizer.learning_rate")
    if not 0 <= cfg.optimizer.momentum < 1:
        _fail("optimizer.momentum", cfg.optimizer.momentum, "must be in [0, 1)")
    if cfg.optimizer.weight_decay < 0:
        _fail("optimizer.weight_decay", cfg.optimizer.weight_decay, "must be >= 0")
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
        _positive(cfg, f"wireless.{name}")
    if not 0 <= cfg.wireless.min_distance_m < cfg.wireless.radius_m:
        _fail(
            "wireless.min_distance_m",
            cfg.wireless.min_distance_m,
            f"must be in [0, wireless.radius_m={cfg.wireless.radius_m})",
        )
    if cfg.wireless.cpu_min_hz > cfg.wireless.cpu_max_hz:
        _fail("wireless.cpu_min_hz", cfg.wireless.cpu_min_hz, "must be <= wireless.cpu_max_hz")
    if cfg.wireless.shadowing_std_db < 0:
        _fail("wireless.shadowing_std_db", cfg.wireless.shadowing_std_db, "must be >= 0")
    _choice(cfg, "allocation.method", ("pgd", "bcd", "equal", "max_power"))
    _int_in(cfg, "allocation.bits_min", 1, 31)
    _int_in(cfg, "allocation.bits_max", cfg.allocation.bits_min, 31)
    _positive(cfg, "allocation.value_range")
    _int_in(cfg, "allocation.pgd_steps", 1)
    try:
        allocation_weights(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _int_in(cfg, "checkpoint.every", 1)
    _int_in(cfg, "checkpoint.max_to_keep", 1)


def system_params(cfg: ml_collections.ConfigDict):
    """``wireless.channel.SystemParams`` from ``config.wireless``."""
    from sflam_jax.wireless.channel import SystemParams

    return SystemParams(**{k: float(v) for k, v in cfg.wireless.items()})


def allocation_weights(cfg: ml_collections.ConfigDict):
    """``allocation.problem.Weights`` from ``config.allocation`` (validated there)."""
    from sflam_jax.allocation.problem import Weights

    a = cfg.allocation
    return Weights(
        w_t=float(a.w_t),
        w_e=float(a.w_e),
        bits_min=a.bits_min,
        bits_max=a.bits_max,
        eps_q=float(a.eps_q),
        value_range=float(a.value_range),
        down_bits=cfg.quant.down_bits,
    )


def validate_data(cfg: ml_collections.ConfigDict, image_shape, train_size: int) -> None:
    """The rules that need the data: channels, patch size, enough samples per client."""
    channels = image_shape[-1]
    if len(cfg.data.mean) not in (1, channels):
        _fail("data.mean", cfg.data.mean, f"needs 1 or {channels} entries (the data's channels)")
    size = cfg.data.image_size or image_shape[0]
    patch = cfg.model.patch_size or PRESETS[cfg.model.preset][4]
    if not cfg.model.pretrained and size % patch:
        _fail("model.patch_size", patch, f"must divide the image size {size}")
    if cfg.data.num_clients * cfg.data.min_client_samples > train_size:
        _fail(
            "data.num_clients",
            cfg.data.num_clients,
            f"times data.min_client_samples={cfg.data.min_client_samples} exceeds the "
            f"{train_size} training samples",
        )


def validate_partition(cfg: ml_collections.ConfigDict, client_sizes) -> None:
    """The rules that need the partition: a batch must fit in the largest client's data."""
    largest = max(int(n) for n in client_sizes)
    if largest == 0:
        _fail("data.num_clients", cfg.data.num_clients, "leaves every client without samples")
    if cfg.train.batch_size > largest:
        _fail(
            "train.batch_size",
            cfg.train.batch_size,
            f"exceeds the largest client's {largest} samples (every batch would be padded); "
            "use a smaller batch or fewer clients",
        )
