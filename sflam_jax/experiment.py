"""Building an experiment from its config: data, partition, model split, protocol, engine, mesh.

``build_experiment`` makes everything a run needs that does not depend on where it runs (no mesh,
no device data); ``build_run`` places it on the mesh and compiles the round. The trainer
(``train.py``), the sweeps (``sweep.py``), the scripts and the notebooks all build through here.
The config's blocks become library objects here too (``system_params``, ``allocation_weights``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import ml_collections
import numpy as np

from sflam_jax import events, quant
from sflam_jax.algorithms import registry, sparse
from sflam_jax.algorithms.base import (
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
from sflam_jax.models import pretrained, vit
from sflam_jax.models import split as split_lib
from sflam_jax.sharding import Layout
from sflam_jax.streaming import StreamedRound, owned_clients
from sflam_jax.validation import validate, validate_data, validate_partition
from sflam_jax.wireless.channel import SystemParams
from sflam_jax.wireless.costs import Workload, device_memory_bytes

# -- config blocks -> library objects -------------------------------------------------------


def system_params(cfg: ml_collections.ConfigDict) -> SystemParams:
    """``wireless.channel.SystemParams`` from ``config.wireless``."""
    return SystemParams(**{k: float(v) for k, v in cfg.wireless.items()})


def allocation_weights(cfg: ml_collections.ConfigDict) -> Weights:
    """``allocation.problem.Weights`` from ``config.allocation`` (validated there); the downlink
    bits are the protocol's."""
    a = cfg.allocation
    return Weights(
        w_t=float(a.w_t),
        w_e=float(a.w_e),
        bits_min=a.bits_min,
        bits_max=a.bits_max,
        eps_q=float(a.eps_q),
        value_range=float(a.value_range),
        down_bits=registry.get(cfg.algorithm).cut_bits(cfg.quant)[1],
    )


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


# fold_in constant of the initialisation key for parameters a protocol adds (SFPrompt's prompts).
_PROTOCOL_PARAMS = 0x9707


def initial_state(model, params: dict, init_key: jax.Array) -> RoundState:
    """The state before round 1: the whole ViT tree cut into the model's two segments."""
    params_c, params_s = model.segments(params, jax.random.fold_in(init_key, _PROTOCOL_PARAMS))
    return RoundState.create(params_c, params_s)


# -- system model ---------------------------------------------------------------------------


def build_planner(config, model_cfg: vit.ViTConfig, params_c: dict, params_s: dict):
    """The per-round resource planner of the protocol; FLOPs come from XLA's cost analysis of the
    float segments (``params_c``, ``params_s``: the cut at ``model.cut_layer``, shapes suffice).

    The protocol's accepted allocators and bits policy apply (the baselines run at full power on
    equal bandwidth shares with float cut-layer traffic); its cost model gives the round's
    latency and energy, and every baseline protocol's costs are reported next to them.
    """
    protocol = registry.get(config.algorithm)
    if protocol.events:
        raise ConfigError(
            f"algorithm={config.algorithm!r} has no round planner: its event engine costs each "
            "client's trip (sflam_jax.events, docs/ftte.md)"
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
    )
    if protocol.workload is not None:
        # The protocol's own workload on its own segments; it carries the cut's for the
        # comparison protocols.
        model = protocol.build(config, model_cfg)
        own_c, own_s = model.segments(split_lib.merge_params(params_c, params_s), jax.random.key(0))
        workload = protocol.workload(model, own_c, own_s, workload, config)
    free_bits = protocol.optimizes_bits and config.allocation.optimize_bits
    planner = protocol.bind(protocol.planner or RoundPlanner, config)
    return planner(
        method=config.allocation.method,
        workload=workload,
        params=system_params(config),
        weights=allocation_weights(config),
        cost_model=protocol.bind(protocol.cost_model, config),
        cost_split=protocol.cost_split,
        comparisons=tuple((p.name, p.cost_model) for p in registry.baselines()),
        fixed_bits=None if free_bits else protocol.cut_bits(config.quant)[0],
        pgd=PGDOptions(steps=config.allocation.pgd_steps),
        loads=None if protocol.loads is None else protocol.bind(protocol.loads, config),
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
    config, protocol: Protocol, model, preprocess, planner, layout=None, client_sizes=None
) -> Engine:
    """The round engine of ``protocol`` with the config's training fields; ``client_sizes`` (the
    partition's) choose the lane count when ``train.chunk_size = 0`` under the lanes schedule."""
    algorithm = protocol.bind(protocol.make, config)(
        model=model,
        optimizer=make_optimizer(config.optimizer),
        preprocess=preprocess,
        local_epochs=config.train.local_epochs,
        batch_size=config.train.batch_size,
        down_bits=protocol.cut_bits(config.quant)[1],
    )
    engine = Engine(
        algorithm=algorithm,
        clients_per_round=config.train.clients_per_round,
        chunk_size=config.train.chunk_size,
        planner=planner,
        layout=layout,
        schedule=config.train.schedule,
    )
    if (
        algorithm.parallel
        and engine.schedule == "lanes"
        and not engine.chunk_size
        and client_sizes is not None
    ):
        engine = dataclasses.replace(engine, chunk_size=choose_lanes(config, engine, client_sizes))
    return engine


def select_subset(config, training: sparse.SubsetTraining, params: dict, dataset, run_key):
    """``w*`` of ``config.algorithm`` (FTTE's ``ftte.selection`` under its memory budget; every
    parameter for FedBuff) and the budget it was chosen for (bytes; None: no selection)."""
    f = config.ftte
    everything = frozenset(sparse.leaf_paths(params))
    if not registry.get(config.algorithm).options(config)["sparse"] or f.selection == "all":
        return everything, None
    field = "ftte.memory_budget_bytes"
    budget = float(f.memory_budget_bytes)
    if not budget:
        field = "ftte.device_memory_min_bytes"
        budget = float(
            events.device_memories(
                run_key,
                config.data.num_clients,
                f.device_memory_min_bytes,
                f.device_memory_max_bytes,
            ).min()
        )
    batch = (config.train.batch_size, *dataset.image_shape)
    if f.selection == "last_blocks":
        return sparse.select_last_blocks(training, params, batch, budget, field), budget
    n = min(f.proxy_samples, len(dataset.train_labels))
    proxy = (dataset.train_images[:n], dataset.train_labels[:n].astype(np.int32))
    chosen = sparse.select_greedy(training, params, batch, budget, field, proxy, f.proxy_steps)
    return chosen, budget


def build_event_engine(config, model_cfg, model, params: dict, preprocess, dataset):
    """The event loop of an asynchronous protocol (``sflam_jax.events``): its trainable subset,
    buffer rule, trip costs and stragglers, and the numbers ``system.json`` reports (device
    training memory and bytes per update of ``w*`` against the whole model)."""
    protocol = registry.get(config.algorithm)
    training = sparse.SubsetTraining(
        logits=model.whole_logits, preprocess=preprocess, optimizer=make_optimizer(config.optimizer)
    )
    key = run_key(config.seed)
    subset, budget = select_subset(config, training, params, dataset, key)
    batch = (config.train.batch_size, *dataset.image_shape)
    cost = training.cost(params, subset, batch)
    full = training.cost(params, frozenset(sparse.leaf_paths(params)), batch)
    f = config.ftte
    engine = events.EventEngine(
        clients=protocol.make(
            training=training,
            subset=subset,
            local_epochs=config.train.local_epochs,
            batch_size=config.train.batch_size,
        ),
        rule=protocol.options(config)["rule"],
        concurrency=f.concurrency,
        buffer_size=f.buffer_size,
        num_clients=config.data.num_clients,
        cut_layer=config.model.cut_layer,
        depth=model_cfg.depth,
        system=system_params(config),
        cost=cost,
        total_params=sparse.size(params),
        slowdown=events.straggler_slowdowns(
            key, config.data.num_clients, f.straggler_fraction, f.straggler_slowdown
        ),
    )
    names = [name for name, unit in sparse.units(params) if unit <= subset]
    system = {
        "trainable_units": names,
        "trainable_params": cost.params,
        "total_params": engine.total_params,
        "memory_budget_bytes": budget,
        "device_memory_bytes": cost.memory_bytes,
        "full_device_memory_bytes": full.memory_bytes,
        "flops_per_sample": cost.flops_per_sample,
        "full_flops_per_sample": full.flops_per_sample,
        "update_bytes": 4.0 * cost.params,
        "full_update_bytes": 4.0 * engine.total_params,
        "stragglers": int((engine.slowdown > 1).sum()),
    }
    return engine, system


# -- the experiment -------------------------------------------------------------------------


def run_key(seed) -> jax.Array:
    """The run's key: the second half of ``split(key(seed))`` (the first initialises the model);
    rounds fold their index into it, the event engine its dispatch and client counters."""
    return jax.random.split(jax.random.key(seed))[1]


def round_key(seed, r) -> jax.Array:
    """The key of round ``r`` (0-based): ``fold_in(run_key, r)``, traced inside the jitted round
    so every process derives it from the same two integers."""
    return jax.random.fold_in(run_key(seed), r)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment built from its config, not yet placed on devices (``build_experiment``).

    Attributes:
      protocol: the registered protocol of ``config.algorithm``.
      engine: its round (no layout: one device, default placement).
      initial: the state before round 1 (not placed).
      system: the workload and device-memory numbers written to ``system.json``.
    """

    config: ml_collections.ConfigDict
    protocol: Protocol
    dataset: Dataset
    parts: list
    model: split_lib.SplitModel
    preprocess: Preprocess
    engine: Engine
    initial: RoundState
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

    init_key, _ = jax.random.split(jax.random.key(config.seed))
    model_cfg, model, params, preprocess = build_model(config, dataset, init_key)
    if protocol.events:
        engine, system = build_event_engine(config, model_cfg, model, params, preprocess, dataset)
        params_c, params_s = model.segments(params)
        initial = events.AsyncState.create(
            params_c, params_s, engine.clients.subset, engine.concurrency, config.data.num_clients
        )
        return Experiment(
            config, protocol, dataset, parts, model, preprocess, engine, initial, system
        )
    initial = initial_state(model, params, init_key)
    # FLOPs and memory from the parameter shapes alone: XLA's cost analysis of arrays placed on
    # a mesh would count one device's share.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    params_c, params_s = split_lib.split_params(shapes, config.model.cut_layer, model_cfg.depth)
    planner = build_planner(config, model_cfg, params_c, params_s)
    system = {
        **dataclasses.asdict(planner.workload),
        **device_memory(config, model_cfg, params_c, params_s),
    }
    engine = build_engine(
        config, protocol, model, preprocess, planner, client_sizes=[len(p) for p in parts]
    )
    if engine.algorithm.parallel:
        # The lanes the engine chose (train.chunk_size = 0) or was given, rounded to the mesh.
        system["lanes"] = engine.chunk
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
    up_bits = registry.get(config.algorithm).cut_bits(config.quant)[0]
    layout = engine.layout
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
            engine, host, config.train.chunks_per_block, up_bits, state_shardings, key_of
        )
    client_data = layout.replicate(
        make_client_data(dataset.train_images, dataset.train_labels, parts, config.train.batch_size)
    )
    if isinstance(engine, events.EventEngine):
        # Not streamable (validation): the client table is always on the device.
        key = run_key(config.seed)
        step = jax.jit(
            lambda state, data: engine.step(state, data, key),
            donate_argnums=0,
            in_shardings=(state_shardings, layout.replicated),
            out_shardings=(state_shardings, layout.replicated),
        )
        return lambda state, r: step(state, client_data)
    jitted = jax.jit(
        lambda state, data, r: engine.round(state, data, key_of(r), up_bits),
        donate_argnums=0,
        in_shardings=(state_shardings, layout.replicated, layout.replicated),
        out_shardings=(state_shardings, layout.replicated),
    )
    return lambda state, r: jitted(state, client_data, np.int32(r))


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
    state_shardings: RoundState | None = None
    round_fn: object = None


def build_run(config: ml_collections.ConfigDict, dataset: Dataset | None = None) -> Run:
    """``build_experiment`` placed on the mesh of ``config.sharding`` with its compiled round
    (``jax.distributed`` must already be started for a multi-process run)."""
    exp = build_experiment(config, dataset)
    layout = Layout.from_config(config.sharding)
    if exp.protocol.events:
        # The event loop's state (model, in-flight results) is replicated.
        state_shardings = jax.tree.map(lambda _: layout.replicated, exp.initial)
    else:
        state_shardings = layout.state_shardings(exp.initial)
    engine = dataclasses.replace(exp.engine, layout=layout)
    fields = {f.name: getattr(exp, f.name) for f in dataclasses.fields(Experiment)}
    fields.update(engine=engine, initial=layout.place(exp.initial, state_shardings))
    return Run(
        **fields,
        layout=layout,
        state_shardings=state_shardings,
        round_fn=make_round(config, engine, state_shardings, exp.dataset, exp.parts),
    )
