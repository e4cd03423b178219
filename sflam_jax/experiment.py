"""Building an experiment from its config: data, partition, model split, protocol, engine, mesh.

``build_experiment`` makes everything a run needs that does not depend on where it runs (no mesh,
no device data); ``build_run`` places it on the mesh and compiles the round. The trainer
(``train.py``), the sweeps (``sweep.py``), the scripts and the notebooks all build through here.
Nothing here names a protocol: a protocol with its own engine builds it through
``Protocol.engine``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from sflam_jax import quant, streams
from sflam_jax.algorithms import registry
from sflam_jax.algorithms.base import (
    Adapters,
    EngineInputs,
    Preprocess,
    Protocol,
    RoundState,
    make_optimizer,
    optimizer_slots,
)
from sflam_jax.allocation.pgd import PGDOptions
from sflam_jax.allocation.planner import RoundPlanner
from sflam_jax.allocation.problem import Weights
from sflam_jax.data.batches import HostClients, make_client_data
from sflam_jax.data.datasets import Dataset, first_test_samples, load_dataset
from sflam_jax.data.partition import partition
from sflam_jax.engine import Engine
from sflam_jax.errors import ConfigError
from sflam_jax.models import lora as lora_lib
from sflam_jax.models import pretrained, vit
from sflam_jax.models import split as split_lib
from sflam_jax.sharding import Layout
from sflam_jax.streaming import StreamedRound, owned_clients
from sflam_jax.validation import validate, validate_data, validate_partition
from sflam_jax.wireless.channel import SystemParams
from sflam_jax.wireless.costs import Workload, device_memory_bytes

# -- config blocks -> library objects -------------------------------------------------------


# -- model ----------------------------------------------------------------------------------


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
    """The ViT for this data, its split with the protocol's matmuls (AQT where the protocol and
    ``config.aqt`` ask for it), its initial parameters (random, or ``model.pretrained`` adapted to
    the data, or with ``model.random_init`` that architecture drawn from ``key``) and the input
    preprocessing."""
    image_size = config.data.image_size or dataset.image_shape[0]
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    if config.model.pretrained:
        checkpoint = pretrained.load(config.model.pretrained)
        image_size = config.data.image_size or checkpoint.config.image_size
        model_cfg, params = pretrained.adapt(checkpoint, image_size, dataset.num_classes)
        if config.model.random_init:
            params = vit.init_params(model_cfg, key)
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
    preprocess = Preprocess(
        mean=mean, std=std, image_size=model_cfg.image_size, channels=model_cfg.channels
    )
    protocol = registry.get(config.algorithm)
    if protocol.build is not None:
        # The protocol's own split of the architecture (SFPrompt's U-shape).
        return model_cfg, protocol.build(config, model_cfg), params, preprocess
    client_dg, server_dg = quant.segment_dot_generals(config.aqt, protocol.aqt)
    model = split_lib.split(
        model_cfg,
        config.model.cut_layer,
        client_dot_general_cls=client_dg,
        server_dot_general_cls=server_dg,
    )
    return model_cfg, model, params, preprocess


def initial_state(model, params: dict, init_key: jax.Array, lora_cfg=None) -> RoundState:
    """The state before round 1: the whole ViT tree cut into the model's two segments; with
    ``lora_cfg.rank`` (the config's ``lora`` block) adapters on the targeted layers of the
    segments ``lora.segments`` names and their frozen base stored at ``lora.base_bits``. Under
    ``"both"`` a segment without a targeted layer (the device's at ``model.cut_layer = 0``) gets
    none and is frozen or trains whole as ``lora.unadapted`` says (``segment_mode``).

    Raises:
      ConfigError: the targets name no dense layer of a segment ``lora.segments`` names alone,
        or of either segment.
    """
    params_c, params_s = model.segments(params, streams.stream(init_key, streams.PROTOCOL_PARAMS))
    if lora_cfg is None or not lora_cfg.rank:
        return RoundState.create(params_c, params_s)
    segments, adapted = [], []
    for i, (segment, side) in enumerate(((params_c, "device"), (params_s, "server"))):
        paths = lora_lib.target_paths(segment, lora_cfg.targets)
        if lora_cfg.segments in ("both", side) and paths:
            key = jax.random.fold_in(streams.stream(init_key, streams.ADAPTERS), i)
            segment = lora_lib.add_adapters(segment, paths, lora_cfg.rank, lora_cfg.alpha, key)
            adapted.append(side)
        elif lora_cfg.segments == side:
            raise _no_target(lora_cfg, side, segment)
        mode = segment_mode(lora_cfg, segment)
        if mode != "whole":  # the frozen base at base_bits (the head trains)
            train, base = Adapters(mode, mode, lora_cfg.aggregation == "fedavg").split(
                segment, mode
            )
            segment = lora_lib.combine(train, lora_lib.quantize_base(base, lora_cfg.base_bits))
        segments.append(segment)
    if not adapted:
        raise _no_target(lora_cfg, "device or server", {**params_c, **params_s})
    return RoundState.create(*segments)


def segment_mode(lora_cfg, params: dict) -> str:
    """A segment's ``Adapters`` mode: ``"adapters"`` when it holds adapters, else what
    ``lora.unadapted`` says."""
    if any(p.endswith(lora_lib.LORA_A) for p in lora_lib.flat_paths(params)):
        return "adapters"
    return "frozen" if lora_cfg.unadapted == "freeze" else "whole"


def _no_target(lora_cfg, side: str, params: dict) -> ConfigError:
    return ConfigError(
        f"lora.targets={lora_cfg.targets!r} names no dense layer of the {side} segment "
        f"(lora.segments={lora_cfg.segments!r}); its layers: "
        f"{', '.join(lora_lib.target_paths(params, '.')[:8])}, ..."
    )


def adapters_of(config, initial: RoundState):
    """``SplitTraining.adapters`` of the config's ``lora`` block for the segments of ``initial``
    that carry adapters (None when the rank is 0)."""
    if not config.lora.rank:
        return None
    return Adapters(
        client=segment_mode(config.lora, initial.params_c),
        server=segment_mode(config.lora, initial.params_s),
        trains_a=config.lora.aggregation == "fedavg",
    )


# -- system model ---------------------------------------------------------------------------


def build_planner(
    config,
    model_cfg: vit.ViTConfig,
    params_c: dict,
    params_s: dict,
    client_shared: int | None = None,
):
    """The per-round resource planner of the protocol; FLOPs come from XLA's cost analysis of the
    float segments (``params_c``, ``params_s``: the cut at ``model.cut_layer``, shapes suffice);
    ``client_shared``: the client parameters aggregated when not all (``Workload``).

    The protocol's accepted allocators and bits policy apply (the baselines run at full power on
    equal bandwidth shares with float cut-layer traffic); its cost model gives the round's
    latency and energy, and every baseline protocol's costs are reported next to them.
    """
    protocol = registry.get(config.algorithm)
    if protocol.engine is not None:
        raise ConfigError(
            f"algorithm={config.algorithm!r} has no round planner: its own engine costs its "
            "clients (Protocol.engine)"
        )
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
        client_shared=client_shared,
        client_trains=client_shared is None or client_shared > 0,
    )
    if protocol.costs.workload is not None:
        # The protocol's own workload on its own segments; it carries the cut's for the
        # comparison protocols.
        model = protocol.build(config, model_cfg)
        own_c, own_s = model.segments(split_lib.merge_params(params_c, params_s), jax.random.key(0))
        workload = protocol.costs.workload(model, own_c, own_s, workload, config)
    free_bits = protocol.optimizes_bits and config.allocation.optimize_bits
    planner = protocol.bind(protocol.planner or RoundPlanner, config)
    return planner(
        method=config.allocation.method,
        workload=workload,
        params=SystemParams.from_config(config.wireless),
        weights=Weights.from_config(config.allocation, protocol.cut_bits(config.quant)[1]),
        cost_model=(
            None if protocol.costs.model is None else protocol.bind(protocol.costs.model, config)
        ),
        cost_split=protocol.costs.split,
        comparisons=tuple((p.name, p.costs.model) for p in registry.baselines()),
        fixed_bits=None if free_bits else protocol.cut_bits(config.quant)[0],
        pgd=PGDOptions(steps=config.allocation.pgd_steps),
        loads=None if protocol.costs.loads is None else protocol.bind(protocol.costs.loads, config),
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
    slots = optimizer_slots(config.optimizer)
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


def adapter_memory(config, model_cfg: vit.ViTConfig, initial: RoundState, adapters) -> dict:
    """With LoRA: the trained parameters of each segment and the training memory of a device
    and of one server copy, in MiB (``split.adapted_memory_bytes``: the base as stored)."""
    split_model = split_lib.split(model_cfg, config.model.cut_layer)
    image = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    batch = config.train.batch_size
    slots = optimizer_slots(config.optimizer)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), initial)
    out = {}
    for side, apply_fn, params, adapted, input_shape in (
        ("device", split_model.client_apply, shapes.params_c, adapters.client, image),
        ("server", split_model.server_apply, shapes.params_s, adapters.server,
         split_model.smashed_shape),
    ):  # fmt: skip
        train, frozen = adapters.split(params, adapted)
        memory = split_lib.adapted_memory_bytes(
            apply_fn, train, frozen, (batch, *input_shape), slots
        )
        out[f"lora_{side}_trained_params"] = split_lib.num_params(train)
        out[f"lora_{side}_memory_mib"] = memory / 2.0**20
    return out


# The most lanes train.chunk_size = 0 chooses; larger counts are set explicitly.
MAX_AUTO_LANES = 1024


def choose_lanes(config, engine: Engine, client_sizes, rounds: int = 16) -> int:
    """The lane count of ``train.chunk_size = 0`` under the lanes schedule: the most lanes (at
    most S and ``MAX_AUTO_LANES``) that keep at least ``train.min_useful_share`` of the computed
    client steps useful, estimated on ``rounds`` rounds of S clients drawn from the partition's
    sizes (host RNG of ``config.seed``). Fewer lanes waste less of the tail where the longest
    clients finish alone; more lanes run more clients at once. Every count up to 64 is tried, then
    steps of about 1.25x."""
    s = config.train.clients_per_round
    rng = np.random.default_rng(config.seed)
    sizes = np.asarray(client_sizes)
    counts = np.stack([sizes[rng.choice(len(sizes), s, replace=False)] for _ in range(rounds)])
    top = min(s, MAX_AUTO_LANES)
    candidates = set(range(1, min(top, 64) + 1)) | {top}
    c = 64.0
    while c < top:
        candidates.add(int(c))
        c *= 1.25
    candidates = np.asarray(sorted(candidates), np.int32)
    shares = jax.jit(jax.vmap(lambda lanes: engine.useful_share(counts, lanes, top)))(candidates)
    ok = np.asarray(shares) >= config.train.min_useful_share
    return int(candidates[ok].max()) if ok.any() else 1


def build_engine(
    config,
    protocol: Protocol,
    model,
    preprocess,
    planner,
    layout=None,
    client_sizes=None,
    adapters=None,
) -> Engine:
    """The round engine of ``protocol`` with the config's training fields; ``client_sizes`` (the
    partition's) choose the lane count when ``train.chunk_size = 0`` under the lanes schedule;
    ``adapters``: LoRA's trained parts (``adapters_of``)."""
    lora_fields = {"adapters": adapters} if adapters is not None else {}
    algorithm = protocol.bind(protocol.make, config)(
        model=model,
        optimizer=make_optimizer(config.optimizer),
        preprocess=preprocess,
        local_epochs=config.train.local_epochs,
        batch_size=config.train.batch_size,
        down_bits=protocol.cut_bits(config.quant)[1],
        **lora_fields,
    )
    engine = Engine(
        algorithm=algorithm,
        clients_per_round=config.train.clients_per_round,
        chunk_size=config.train.chunk_size,
        planner=planner,
        layout=layout,
        schedule=config.train.schedule,
        up_bits=protocol.cut_bits(config.quant)[0],
    )
    if (
        algorithm.parallel
        and engine.schedule == "lanes"
        and not engine.chunk_size
        and client_sizes is not None
    ):
        engine = dataclasses.replace(engine, chunk_size=choose_lanes(config, engine, client_sizes))
    return engine


# -- the experiment -------------------------------------------------------------------------


def round_engine(config, inputs: EngineInputs):
    """The round engine (``engine.Engine``) of a protocol without its own ``Protocol.engine``:
    its algorithm, the planner, the lanes; the state before round 1 and ``system.json``'s
    workload, device memory and lanes."""
    protocol = registry.get(config.algorithm)
    model_cfg = inputs.model_cfg
    initial = initial_state(inputs.model, inputs.params, inputs.init_key, config.lora)
    # FLOPs and memory from the parameter shapes alone: XLA's cost analysis of arrays placed on
    # a mesh would count one device's share.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs.params)
    params_c, params_s = split_lib.split_params(shapes, config.model.cut_layer, model_cfg.depth)
    adapters = adapters_of(config, initial)
    shared = None
    if adapters is not None:
        shared = split_lib.num_params(adapters.split(initial.params_c, adapters.client)[0])
    planner = build_planner(config, model_cfg, params_c, params_s, shared)
    system = {
        **dataclasses.asdict(planner.workload),
        **device_memory(config, model_cfg, params_c, params_s),
        **(adapter_memory(config, model_cfg, initial, adapters) if adapters else {}),
    }
    engine = build_engine(
        config,
        protocol,
        inputs.model,
        inputs.preprocess,
        planner,
        client_sizes=[len(p) for p in inputs.parts],
        adapters=adapters,
    )
    if engine.algorithm.parallel:
        # The lanes the engine chose (train.chunk_size = 0) or was given, rounded to the mesh.
        system["lanes"] = engine.chunk
    return engine, initial, system


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment built from its config, not yet placed on devices (``build_experiment``).

    Attributes:
      protocol: the registered protocol of ``config.algorithm``.
      engine: its engine (``engine.Engine``, or the protocol's own through ``Protocol.engine``;
        the interface is in ``sflam_jax.engine``'s docstring); no layout: one device, default
        placement.
      initial: the state before round 1 (not placed): the engine's state type.
      system: the workload and device-memory numbers written to ``system.json``.
    """

    config: ml_collections.ConfigDict
    protocol: Protocol
    dataset: Dataset
    parts: list
    model: split_lib.SplitModel
    preprocess: Preprocess
    engine: Any
    initial: Any
    system: dict


def build_experiment(config: ml_collections.ConfigDict, dataset: Dataset | None = None):
    """Data, partition, model split, protocol, engine and initial state of ``config`` (validated
    here). ``dataset`` skips loading ``config.data`` (benchmarks that build many runs of one
    dataset)."""
    validate(config)
    protocol = registry.get(config.algorithm)
    dataset = dataset or load_dataset(config.data)
    validate_data(config, dataset.image_shape, len(dataset.train_labels), len(dataset.test_labels))
    dataset = first_test_samples(dataset, config.data.test_samples)
    parts = partition(dataset.train_labels, config.data, config.seed)
    validate_partition(config, [len(p) for p in parts])

    init_key = streams.init_key(config.seed)
    model_cfg, model, params, preprocess = build_model(config, dataset, init_key)
    inputs = EngineInputs(dataset, parts, model_cfg, model, params, preprocess, init_key)
    engine, initial, system = (protocol.engine or round_engine)(config, inputs)
    return Experiment(
        config=config,
        protocol=protocol,
        dataset=dataset,
        parts=parts,
        model=model,
        preprocess=preprocess,
        engine=engine,
        initial=initial,
        system=system,
    )


def make_round(config, engine: Engine, state_shardings, dataset: Dataset, parts):
    """``round_fn(state, r) -> (state, metrics)``: the jitted round over a device-resident client
    table, or with ``train.stream`` (always with several processes) the host-streamed round over
    this process's clients."""
    layout = engine.layout
    if config.train.stream or jax.process_count() > 1:
        # Only protocols on the round engine are streamable (validation).
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
        key_of = functools.partial(streams.round_key, config.seed)
        return StreamedRound(
            engine, host, config.train.chunks_per_block, engine.up_bits, state_shardings, key_of
        )
    client_data = layout.replicate(
        make_client_data(dataset.train_images, dataset.train_labels, parts, config.train.batch_size)
    )
    return engine.compile(state_shardings, client_data, config.seed)


@dataclasses.dataclass(frozen=True)
class Run(Experiment):
    """An experiment placed on the mesh, ready to train (``build_run``).

    Attributes:
      layout: the mesh and the placement rules; ``engine`` carries it too.
      state_shardings: NamedShardings of the round state.
      round_fn: ``(state, r) -> (state, metrics)``, round ``r`` (0-based) from ``state``.
      initial: the state before round 1, placed on the mesh.
    """

    layout: Layout | None = None
    state_shardings: Any = None
    round_fn: object = None


def build_run(config: ml_collections.ConfigDict, dataset: Dataset | None = None) -> Run:
    """``build_experiment`` placed on the mesh of ``config.sharding`` with its compiled round
    (``jax.distributed`` must already be started for a multi-process run)."""
    exp = build_experiment(config, dataset)
    layout = Layout.from_config(config.sharding)
    state_shardings = exp.engine.state_shardings(layout, exp.initial)
    engine = dataclasses.replace(exp.engine, layout=layout)
    fields = {f.name: getattr(exp, f.name) for f in dataclasses.fields(Experiment)}
    fields.update(engine=engine, initial=layout.place(exp.initial, state_shardings))
    return Run(
        **fields,
        layout=layout,
        state_shardings=state_shardings,
        round_fn=make_round(config, engine, state_shardings, exp.dataset, exp.parts),
    )
