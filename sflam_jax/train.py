"""The trainer: config -> data -> model split -> state -> jit round -> resume -> loop."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from sflam_jax import quant
from sflam_jax.algorithms.base import (
    HEALTH,
    Preprocess,
    RoundState,
    check_health,
    make_evaluate,
    make_optimizer,
)
from sflam_jax.algorithms.sequential import SequentialServer
from sflam_jax.algorithms.sflam import SFLAM
from sflam_jax.algorithms.streaming import StreamedRound, owned_clients
from sflam_jax.allocation.pgd import PGDOptions
from sflam_jax.allocation.planner import RoundPlanner
from sflam_jax.checkpoint import Checkpointer
from sflam_jax.config import (
    allocation_weights,
    system_params,
    to_record,
    validate,
    validate_data,
    validate_partition,
)
from sflam_jax.data.batches import HostClients, make_client_data
from sflam_jax.data.datasets import Dataset, load_dataset
from sflam_jax.data.partition import partition
from sflam_jax.errors import ConfigError
from sflam_jax.metrics import MetricWriter, atomic_write_text, read_jsonl, to_python
from sflam_jax.models import pretrained, vit
from sflam_jax.models import split as split_lib
from sflam_jax.sharding import Layout, initialize_distributed, set_cpu_devices
from sflam_jax.wireless.costs import Workload, device_memory_bytes


def preset_config(config, image_shape, num_classes: int) -> vit.ViTConfig:
    """The ViT of ``model.preset`` for images of ``image_shape`` (H, W, C) and these classes."""
    return vit.vit_config(
        config.model.preset,
        image_size=config.data.image_size or image_shape[0],
        channels=image_shape[-1],
        num_classes=num_classes,
        patch_size=config.model.patch_size or None,
        layer_norm_eps=config.model.layer_norm_eps,
    )


def build_model(config, dataset: Dataset, key: jax.Array):
    """The ViT for this data, its split with the configured AQT matmuls, its initial parameters
    (random, or ``model.pretrained`` adapted to the data) and the input preprocessing."""
    image_size = config.data.image_size or dataset.image_shape[0]
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    if config.model.pretrained:
        checkpoint = pretrained.load(config.model.pretrained)
        image_size = config.data.image_size or checkpoint.config.image_size
        model_cfg, params = pretrained.adapt(checkpoint, image_size, dataset.num_classes)
        if config.model.cut_layer > model_cfg.depth:
            raise ConfigError(
                f"model.cut_layer={config.model.cut_layer} is invalid: the checkpoint "
                f"{config.model.pretrained!r} has {model_cfg.depth} blocks"
            )
        # The checkpoint's own normalisation, as its image processor would apply it.
        mean, std = checkpoint.image_mean, checkpoint.image_std
    else:
        model_cfg = preset_config(config, dataset.image_shape, dataset.num_classes)
        params = vit.init_params(model_cfg, key)
    dg = None
    # AQT belongs to SFLAM; the baseline protocols train float models.
    if config.aqt.enabled and config.algorithm == "sflam":
        dg = quant.aqt_dot_general_cls(config.aqt.fwd_bits or None, config.aqt.bwd_bits or None)
    model = split_lib.split(
        model_cfg,
        config.model.cut_layer,
        client_dot_general_cls=dg if config.aqt.client else None,
        server_dot_general_cls=dg if config.aqt.server else None,
    )
    preprocess = Preprocess(
        mean=mean, std=std, image_size=model_cfg.image_size, channels=model_cfg.channels
    )
    return model_cfg, model, params, preprocess


def cut_bits(config) -> tuple[int, int]:
    """Uplink and downlink cut-layer bits: the config's for SFLAM, float (32) for the baselines."""
    if config.algorithm == "sflam":
        return config.quant.up_bits, config.quant.down_bits
    return quant.FLOAT_BITS, quant.FLOAT_BITS


def build_algorithm(config, model, preprocess, planner, layout=None):
    """The protocol of ``config.algorithm`` (SPEC section 1).

    ``sflam``, ``sfl`` and ``fl`` are the vmapped SFL-V1 round: ``sfl`` with float cut-layer
    traffic, and ``fl`` the same float round, which is FedAvg of the whole model on each device
    (with the identity quantizer every client's server copy and device segment train exactly as the
    unsplit model would), costed as FL. ``sfl_v2`` and ``sl`` share one server segment client after
    client (``algorithms.sequential``).
    """
    common = dict(
        model=model,
        optimizer=make_optimizer(config.optimizer),
        preprocess=preprocess,
        clients_per_round=config.train.clients_per_round,
        local_epochs=config.train.local_epochs,
        batch_size=config.train.batch_size,
        down_bits=cut_bits(config)[1],
        chunk_size=config.train.chunk_size,
        planner=planner,
        layout=layout,
    )
    if config.algorithm in ("sfl_v2", "sl"):
        return SequentialServer(**common, relay_client=config.algorithm == "sl")
    return SFLAM(**common)


def build_planner(config, model_cfg: vit.ViTConfig, params_c: dict, params_s: dict):
    """The per-round resource planner; FLOPs come from XLA's cost analysis of the float segments.

    SFLAM uses ``config.allocation``; the baselines run at full power on equal bandwidth shares with
    float cut-layer traffic and report their own protocol's latency and energy.
    """
    float_model = split_lib.split(model_cfg, config.model.cut_layer)
    image_shape = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    client_flops, server_flops = split_lib.segment_flops(
        float_model, params_c, params_s, image_shape
    )
    workload = Workload(
        client_flops=client_flops,
        server_flops=server_flops,
        values_per_sample=float_model.values_per_sample,
        client_params=split_lib.num_params(params_c),
        batch_size=config.train.batch_size,
        server_params=split_lib.num_params(params_s),
    )
    if config.algorithm != "sflam":
        return RoundPlanner(
            method="equal",
            workload=workload,
            params=system_params(config),
            weights=allocation_weights(config),
            fixed_bits=quant.FLOAT_BITS,
            protocol=config.algorithm,
        )
    return RoundPlanner(
        method=config.allocation.method,
        workload=workload,
        params=system_params(config),
        weights=allocation_weights(config),
        fixed_bits=None if config.allocation.optimize_bits else config.quant.up_bits,
        pgd=PGDOptions(steps=config.allocation.pgd_steps),
    )


def planner_for(config, image_shape, num_classes: int) -> RoundPlanner:
    """The round planner of ``config`` without data or weights, for system-model studies: FLOPs and
    sizes come from the preset's parameter shapes (nothing is initialised)."""
    validate(config)
    model_cfg = preset_config(config, image_shape, num_classes)
    shapes = jax.eval_shape(lambda k: vit.init_params(model_cfg, k), jax.random.key(0))
    params_c, params_s = split_lib.split_params(shapes, config.model.cut_layer, model_cfg.depth)
    return build_planner(config, model_cfg, params_c, params_s)


def device_memory(config, model_cfg: vit.ViTConfig, params_c: dict, params_s: dict) -> dict:
    """Training memory on a device for SFLAM (client segment) and for FL (whole model), in MiB."""
    batch = (
        config.train.batch_size,
        model_cfg.image_size,
        model_cfg.image_size,
        model_cfg.channels,
    )
    client = split_lib.split(model_cfg, config.model.cut_layer)
    slots = 2 if config.optimizer.name in ("adam", "adamw") else int(config.optimizer.momentum > 0)
    act_c = split_lib.activation_bytes(client.client_apply, params_c, batch)
    # FL trains the unsplit model on the device.
    act_fl = split_lib.activation_bytes(
        lambda p, x, k: vit.ViT(model_cfg).apply({"params": p}, x),
        split_lib.merge_params(params_c, params_s),
        batch,
    )
    mib = 2.0**20
    return {
        "sflam_device_memory_mib": device_memory_bytes(split_lib.num_params(params_c), act_c, slots)
        / mib,
        "fl_device_memory_mib": device_memory_bytes(
            split_lib.num_params(params_c) + split_lib.num_params(params_s), act_fl, slots
        )
        / mib,
    }


def initial_state(model_cfg: vit.ViTConfig, cut_layer: int, params: dict) -> RoundState:
    params_c, params_s = split_lib.split_params(params, cut_layer, model_cfg.depth)
    return RoundState.create(params_c, params_s)


# What a run writes into its workdir; ``fresh=True`` deletes these before starting.
RUN_OUTPUTS = (
    "checkpoints",
    "corrupt_checkpoints",
    "metrics.jsonl",
    "timing.jsonl",
    "tensorboard",
    "config.json",
    "system.json",
)


def discard_outputs(workdir: str) -> None:
    """Deletes a run's checkpoints and metrics (``--fresh``); other files are left alone."""
    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def round_key(seed, r) -> jax.Array:
    """The key of round ``r`` (0-based): ``fold_in(run_key, r)``, traced inside the jitted round
    so every process derives it from the same two integers."""
    _, run_key = jax.random.split(jax.random.key(seed))
    return jax.random.fold_in(run_key, r)


def make_round(config, algorithm, state_shardings, dataset: Dataset, parts):
    """``round_fn(state, r) -> (state, metrics)``: the jitted round over a device-resident client
    table, or with ``train.stream`` (always with several processes) the host-streamed round over
    this process's clients."""
    up_bits = cut_bits(config)[0]
    layout = algorithm.layout
    key_of = functools.partial(round_key, config.seed)
    if config.train.stream or jax.process_count() > 1:
        host = HostClients.create(
            dataset.train_images,
            dataset.train_labels,
            parts,
            config.train.batch_size,
            owned=owned_clients(len(parts), jax.process_count(), jax.process_index()),
        )
        if jax.process_count() > 1:
            print(
                f"sflam_jax: process {jax.process_index()} of {jax.process_count()} holds "
                f"{int(host.owned.sum())} of {len(parts)} clients "
                f"({len(host.labels)} training samples)",
                file=sys.stderr,
            )
        return StreamedRound(
            algorithm, host, config.train.chunks_per_block, up_bits, state_shardings, key_of
        )
    client_data = layout.replicate(
        make_client_data(dataset.train_images, dataset.train_labels, parts, config.train.batch_size)
    )
    jitted = jax.jit(
        lambda state, data, r: algorithm.round(state, data, key_of(r), up_bits),
        donate_argnums=0,
        in_shardings=(state_shardings, layout.replicated, layout.replicated),
        out_shardings=(state_shardings, layout.replicated),
    )
    return lambda state, r: jitted(state, client_data, np.int32(r))


def evaluate_state(evaluate, state: RoundState, images, labels) -> dict:
    """Test loss and accuracy of the global model, as host values."""
    return jax.device_get(evaluate(state.params_c, state.params_s, images, labels))


@dataclasses.dataclass(frozen=True)
class Run:
    """An experiment built from its config, ready to train (``build_run``).

    Attributes:
      round_fn: ``(state, r) -> (state, metrics)``, round ``r`` (0-based) from ``state``.
      initial: the state before round 1, placed on the mesh.
      system: the workload and device-memory numbers written to ``system.json``.
    """

    config: ml_collections.ConfigDict
    dataset: Dataset
    parts: list
    model: split_lib.SplitModel
    preprocess: Preprocess
    algorithm: SFLAM
    layout: Layout
    state_shardings: RoundState
    initial: RoundState
    round_fn: object
    system: dict


def build_run(config: ml_collections.ConfigDict, dataset: Dataset | None = None) -> Run:
    """Data, partition, model split, mesh, initial state and the jitted round of ``config``
    (validated here; ``jax.distributed`` must already be started for a multi-process run).
    ``dataset`` skips loading ``config.data`` (benchmarks that build many runs of one dataset)."""
    validate(config)
    dataset = dataset or load_dataset(config.data)
    validate_data(config, dataset.image_shape, len(dataset.train_labels))
    parts = partition(dataset.train_labels, config.data, config.seed)
    validate_partition(config, [len(p) for p in parts])

    init_key, _ = jax.random.split(jax.random.key(config.seed))
    model_cfg, model, params, preprocess = build_model(config, dataset, init_key)
    initial = initial_state(model_cfg, config.model.cut_layer, params)
    # FLOPs and memory from the parameter shapes alone: XLA's cost analysis of arrays placed on
    # a mesh would count one device's share.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), initial)
    planner = build_planner(config, model_cfg, shapes.params_c, shapes.params_s)
    system = {
        **dataclasses.asdict(planner.workload),
        **device_memory(config, model_cfg, shapes.params_c, shapes.params_s),
    }
    layout = Layout.from_config(config.sharding)
    state_shardings = layout.state_shardings(initial)
    initial = layout.place(initial, state_shardings)
    algorithm = build_algorithm(config, model, preprocess, planner, layout)
    return Run(
        config=config,
        dataset=dataset,
        parts=parts,
        model=model,
        preprocess=preprocess,
        algorithm=algorithm,
        layout=layout,
        state_shardings=state_shardings,
        initial=initial,
        round_fn=make_round(config, algorithm, state_shardings, dataset, parts),
        system=system,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, fresh: bool = False
) -> dict:
    """Runs (or resumes) the experiment of ``config`` in ``workdir``.

    Writes ``workdir/metrics.jsonl`` (one record per round; with ``eval_every`` a round-0 record
    of the starting model's test metrics first), ``timing.jsonl``, ``config.json`` and
    orbax checkpoints under ``workdir/checkpoints``. Returns the last round's record.

    Args:
      config: the experiment (validated here).
      workdir: the run directory; a run already there is resumed from its newest good checkpoint.
      fresh: delete the run's checkpoints and metrics first instead of resuming.

    Raises:
      ConfigError: a bad config field (named in the message).
      CheckpointMismatchError: ``workdir`` holds checkpoints of another config.
      NonFiniteError: a round produced a non-finite loss or parameter (round and client named).
    """
    validate(config)
    set_cpu_devices(config.sharding)
    initialize_distributed(config.distributed)
    primary = jax.process_index() == 0
    if fresh and primary:
        discard_outputs(workdir)
    os.makedirs(workdir, exist_ok=True)

    run = build_run(config)
    initial, layout, round_fn = run.initial, run.layout, run.round_fn
    test_images = layout.replicate(run.dataset.test_images)
    test_labels = layout.replicate(run.dataset.test_labels)

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        config.checkpoint.every,
        config.checkpoint.max_to_keep,
        to_record(config),
    )
    try:
        state = checkpointer.restore_or_init(initial)
    except BaseException:
        checkpointer.close()
        raise
    start = int(state.round)
    # Process 0 writes the run's files; the others compute alongside it.
    writer = None
    if primary:
        # Written once the checkpoints are known to belong to this config.
        atomic_write_text(
            os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
        )
        atomic_write_text(os.path.join(workdir, "system.json"), json.dumps(run.system, indent=2))
        # Records after the restored round are dropped (those rounds run again); a run
        # restarting from round 0 also rewrites its round-0 evaluation.
        writer = MetricWriter(workdir, start if start else -1, config.metrics.tensorboard)
    write = writer.write if writer is not None else lambda *_: None

    evaluate = jax.jit(
        make_evaluate(run.model, run.preprocess, config.train.eval_batch_size),
        in_shardings=(
            run.state_shardings.params_c,
            run.state_shardings.params_s,
            layout.replicated,
            layout.replicated,
        ),
        out_shardings=layout.replicated,
    )

    previous = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    record: dict = previous[-1] if previous else {}
    bar = tqdm(
        total=config.num_rounds,
        initial=start,
        desc="SFLAM rounds",
        unit="round",
        disable=not (config.metrics.progress and primary),
        dynamic_ncols=True,
    )
    last_eval = {}
    t_start = time.perf_counter()
    try:
        if start == 0 and config.eval_every:
            # Round 0: the starting model (the checkpoint's accuracy when fine-tuning).
            last_eval = evaluate_state(evaluate, state, test_images, test_labels)
            record = {"round": 0, **last_eval}
            write(record, {"eval_s": time.perf_counter() - t_start, "elapsed_s": 0.0})
        for r in range(start, config.num_rounds):
            t0 = time.perf_counter()
            state, metrics = round_fn(state, r)
            metrics = jax.device_get(metrics)
            # Stops before anything of this round is written; the last checkpoint stays good.
            check_health(metrics.pop(HEALTH), metrics["clients"], r + 1)
            t1 = time.perf_counter()
            record = {"round": r + 1, **metrics}
            done = r + 1 == config.num_rounds
            if done or (config.eval_every and (r + 1) % config.eval_every == 0):
                last_eval = evaluate_state(evaluate, state, test_images, test_labels)
                record.update(last_eval)
            t2 = time.perf_counter()
            write(
                record,
                {"round_s": t1 - t0, "eval_s": t2 - t1, "elapsed_s": t2 - t_start},
            )
            checkpointer.maybe_save(state, force=done)
            bar.update(1)
            bar.set_postfix(
                loss=f"{float(metrics['train_loss']):.3f}",
                acc=f"{float(last_eval.get('test_accuracy', float('nan'))):.3f}",
            )
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        checkpointer.close()
    return to_python(record)
