"""Grids of experiments: one compiled program for the fields that keep array shapes.

A grid is a set of config fields with several values each; its points are the cartesian product.
Fields in ``VECTOR_FIELDS`` change numbers but not array shapes, so the points that differ only in
them form one group, trained together under ``jax.vmap`` as one jit-compiled round (the round's
state, the partitions and the field values gain a leading points axis). Every other field (model
size, K, S, cut layer, protocol, ...) changes shapes or code, so its values loop, one group each.

Each point writes ``<out>/<point>/metrics.jsonl``, ``config.json`` and ``system.json`` with the
same records a single run of that point writes (``train.train_and_evaluate``); sweeps keep no
checkpoints, and a group whose points all finished is skipped when the sweep is run again. A
point that produces a non-finite value stops there (``<point>/error.txt``); the others go on.

``system_sweep`` evaluates only the system model (latency and energy of a round, no training) for
up to millions of devices, vmapped over the vector fields and mapped over channel draws.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from sflam_jax import experiment, quant, streams
from sflam_jax.algorithms import registry
from sflam_jax.algorithms.base import check_health, make_evaluate, make_optimizer
from sflam_jax.config import flatten
from sflam_jax.data.batches import ClientData, client_table, local_steps
from sflam_jax.data.partition import partition
from sflam_jax.errors import ConfigError, NonFiniteError
from sflam_jax.metrics import MetricWriter, atomic_write_text, read_jsonl, to_python
from sflam_jax.train import run_rounds
from sflam_jax.validation import validate, validate_partition

# Fields batched with vmap. seed and data.alpha change the random partition, which is padded to
# the group's widest client table; allocation.w_e follows as 1 - w_t.
VECTOR_FIELDS = (
    "seed",
    "data.alpha",
    "quant.up_bits",
    "optimizer.learning_rate",
    "wireless.p_max_w",
    "wireless.bandwidth_hz",
    "allocation.w_t",
)


def parse_grid(items: list[str], base: ml_collections.ConfigDict) -> dict[str, list]:
    """``["optimizer.learning_rate=0.05,0.1", "seed=0,1"]`` -> ``{field: [values]}``.

    Values are Python literals; each must have the type of the base config's value.

    Raises:
      ConfigError: an unknown field, a malformed item or a value of the wrong type.
    """
    known = flatten(base)
    grid = {}
    for item in items:
        field, sep, text = item.partition("=")
        field = field.strip()
        if not sep or not text:
            raise ConfigError(f"--grid {item!r} is malformed: expected field=value1,value2,...")
        if field not in known:
            raise ConfigError(f"--grid field {field!r} is not a config field")
        try:
            values = ast.literal_eval(f"[{text}]")
        except (ValueError, SyntaxError):
            raise ConfigError(f"--grid {field}: cannot read the values {text!r}") from None
        want = type(known[field])
        for v in values:
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                continue
            if not isinstance(v, want):
                raise ConfigError(
                    f"--grid {field}={v!r} is invalid: the field holds {want.__name__} values"
                )
        grid[field] = [float(v) if want is float else v for v in values]
    return grid


def _set(cfg, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


def point_name(point: dict, grid: dict[str, list]) -> str:
    """Directory name of a grid point: ``field=value`` of the fields with several values, joined
    by commas (other characters than letters, digits and ``.=,+-`` become ``_``)."""
    name = ",".join(f"{k}={v}" for k, v in point.items() if len(grid[k]) > 1) or "base"
    return re.sub(r"[^A-Za-z0-9.=,+\-]", "_", name)


def grid_points(
    base: ml_collections.ConfigDict, grid: dict[str, list]
) -> list[tuple[dict, object]]:
    """Every point of the grid as ``(assignment, validated config)``."""
    fields = list(grid)
    out = []
    for values in itertools.product(*(grid[f] for f in fields)):
        point = dict(zip(fields, values, strict=True))
        cfg = base.copy_and_resolve_references()
        for field, value in point.items():
            _set(cfg, field, value)
        if "allocation.w_t" in point:
            cfg.allocation.w_e = 1.0 - cfg.allocation.w_t
        try:
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"grid point {point_name(point, grid)}: {e}") from None
        out.append((point, cfg))
    return out


def groups(points: list[tuple[dict, object]]) -> list[list[tuple[dict, object]]]:
    """Points split by the values of their non-vector fields, in grid order."""
    by_key: dict = {}
    for point, cfg in points:
        key = tuple((k, repr(v)) for k, v in point.items() if k not in VECTOR_FIELDS)
        by_key.setdefault(key, []).append((point, cfg))
    return list(by_key.values())


def vector_values(cfgs) -> dict[str, jax.Array]:
    """``{field: [P]}`` the vector fields of each point's config."""
    flat = [flatten(c) for c in cfgs]
    dtype = {"seed": jnp.int32}
    return {f: jnp.asarray([c[f] for c in flat], dtype.get(f, jnp.float32)) for f in VECTOR_FIELDS}


def specialize_planner(planner, protocol, v: dict):
    """The planner of one point, its vector fields set to the (traced) values ``v``."""
    fixed = planner.fixed_bits
    if fixed is not None and protocol.quantized_cut:
        fixed = v["quant.up_bits"]
    return dataclasses.replace(
        planner,
        params=dataclasses.replace(
            planner.params,
            p_max_w=v["wireless.p_max_w"],
            bandwidth_hz=v["wireless.bandwidth_hz"],
        ),
        weights=dataclasses.replace(
            planner.weights, w_t=v["allocation.w_t"], w_e=1.0 - v["allocation.w_t"]
        ),
        fixed_bits=fixed,
    )


def specialize(exp, v: dict):
    """The engine of one point of ``exp``'s group, its vector fields set to the values ``v``."""
    engine = exp.engine
    optimizer = make_optimizer(exp.config.optimizer, learning_rate=v["optimizer.learning_rate"])
    return dataclasses.replace(
        engine,
        algorithm=dataclasses.replace(engine.algorithm, optimizer=optimizer),
        planner=specialize_planner(engine.planner, exp.protocol, v),
    )


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _point_data(exp, cfgs) -> ClientData:
    """The group's client tables, one partition per point padded to a common width: ``index``
    and ``counts`` get a leading points axis, the images are shared."""
    tables = []
    for cfg in cfgs:
        parts = partition(exp.dataset.train_labels, cfg.data, cfg.seed)
        validate_partition(cfg, [len(p) for p in parts])
        tables.append(client_table(parts, cfg.train.batch_size))
    width = max(index.shape[1] for index, _ in tables)
    index = np.stack([np.pad(i, ((0, 0), (0, width - i.shape[1]))) for i, _ in tables])
    return ClientData(
        images=jnp.asarray(exp.dataset.train_images),
        labels=jnp.asarray(exp.dataset.train_labels, jnp.int32),
        index=jnp.asarray(index),
        counts=jnp.asarray(np.stack([c for _, c in tables])),
    )


def _initial_states(exp, cfgs):
    """Each point's starting state (its seed's initialisation), stacked."""
    by_seed = {exp.config.seed: jax.device_get(exp.initial)}
    for cfg in cfgs:
        if cfg.seed not in by_seed:
            init_key, _ = jax.random.split(jax.random.key(cfg.seed))
            _, model, params, _ = experiment.build_model(cfg, exp.dataset, init_key)
            by_seed[cfg.seed] = jax.device_get(
                experiment.initial_state(model, params, init_key, cfg.lora)
            )
    return _stack([by_seed[c.seed] for c in cfgs])


def _done(directory: str, num_rounds: int) -> bool:
    records = read_jsonl(os.path.join(directory, "metrics.jsonl"))
    return bool(records) and records[-1].get("round") == num_rounds


def run_group(cfgs: list, directories: list[str], progress: bool = True) -> None:
    """Trains the points of one group together and writes each point's files.

    Args:
      cfgs: validated configs that differ only in ``VECTOR_FIELDS``.
      directories: one output directory per point.
      progress: show a progress bar over rounds.
    """
    base = cfgs[0]
    if registry.get(base.algorithm).engine is not None:
        raise ConfigError(
            f"algorithm={base.algorithm!r} is invalid in a vectorized sweep: it runs on its own "
            "engine (Protocol.engine), not on the round engine the sweep vectorizes; train its "
            "points one by one with python -m sflam_jax.main"
        )
    # Model, protocol and engine once for the group; the group's client tables live on the device.
    exp = experiment.build_experiment(base)
    up_fixed = None if exp.protocol.quantized_cut else float(quant.FLOAT_BITS)
    data = _point_data(exp, cfgs)
    states = _initial_states(exp, cfgs)
    values = vector_values(cfgs)

    def point_round(state, data, r, v):
        up_bits = v["quant.up_bits"] if up_fixed is None else up_fixed
        return specialize(exp, v).round(state, data, streams.round_key(v["seed"], r), up_bits)

    data_axes = ClientData(images=None, labels=None, index=0, counts=0)
    vmapped = jax.jit(jax.vmap(point_round, in_axes=(0, data_axes, None, 0)), donate_argnums=0)

    def round_fn(states, r):
        return vmapped(states, data, np.int32(r), values)

    evaluate = jax.jit(
        jax.vmap(
            make_evaluate(exp.model, exp.preprocess, base.train.eval_batch_size),
            in_axes=(0, 0, None, None),
        )
    )
    test = (jnp.asarray(exp.dataset.test_images), jnp.asarray(exp.dataset.test_labels))

    writers = []
    for cfg, directory in zip(cfgs, directories, strict=True):
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, "error.txt")):
            os.remove(os.path.join(directory, "error.txt"))
        atomic_write_text(os.path.join(directory, "config.json"), cfg.to_json_best_effort(indent=2))
        atomic_write_text(os.path.join(directory, "system.json"), json.dumps(exp.system, indent=2))
        writers.append(MetricWriter(directory, -1, False))
    alive = [True] * len(cfgs)

    def write(records, timing):
        for i, record in enumerate(records):
            if alive[i]:
                writers[i].write(record, timing)

    def point_eval(states):
        out = jax.device_get(evaluate(states.params_c, states.params_s, *test))
        return [{k: v[i] for k, v in out.items()} for i in range(len(cfgs))]

    def check(health, metrics, round_index):
        # A point that diverges stops writing (its error.txt says why); the others go on.
        for i, directory in enumerate(directories):
            if not alive[i]:
                continue
            try:
                check_health(health[i], metrics["clients"][i], round_index)
            except NonFiniteError as e:
                alive[i] = False
                atomic_write_text(os.path.join(directory, "error.txt"), f"{e}\n")

    bar = tqdm(total=base.num_rounds, desc="sweep rounds", unit="round", disable=not progress)
    try:
        run_rounds(
            round_fn,
            states,
            0,
            base.num_rounds,
            num_rounds=base.num_rounds,
            eval_every=base.eval_every,
            eval_from=base.eval_from,
            evaluate=point_eval,
            split=lambda metrics: [{k: v[i] for k, v in metrics.items()} for i in range(len(cfgs))],
            check=check,
            write=write,
            bar=bar,
        )
    finally:
        bar.close()
        for w in writers:
            w.close()


def run_sweep(base, grid: dict[str, list], out: str, progress: bool = True) -> list[dict]:
    """Trains every point of ``grid`` over ``base``; returns the index written to
    ``<out>/sweep.json`` (each point's fields, directory, group and final record)."""
    points = grid_points(base, grid)
    index = []
    for g, group in enumerate(groups(points)):
        cfgs = [cfg for _, cfg in group]
        dirs = [os.path.join(out, point_name(point, grid)) for point, _ in group]
        if not all(_done(d, cfgs[0].num_rounds) for d in dirs):
            run_group(cfgs, dirs, progress)
        for (point, _), d in zip(group, dirs, strict=True):
            records = read_jsonl(os.path.join(d, "metrics.jsonl"))
            index.append(
                {
                    "point": point,
                    "directory": os.path.basename(d),
                    "group": g,
                    "last": records[-1] if records else None,
                    "error": os.path.exists(os.path.join(d, "error.txt")),
                }
            )
    atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(to_python(index), indent=2))
    return index


def system_sweep(
    base,
    grid: dict[str, list],
    draws: int,
    image_shape=(28, 28, 1),
    num_classes: int = 10,
    train_size: int = 60_000,
) -> list[dict]:
    """Round latency and energy of every grid point from the system model alone (no training).

    Each device holds ``train_size / data.num_clients`` samples. Points of a group are vmapped; the
    ``draws`` channel draws of a point (keys from its seed) are mapped in batches that keep about
    2^22 device values in flight, so S can reach millions.

    Returns:
      One dict per point: its fields, ``clients_per_round`` and the mean and standard deviation
      over draws of every planner metric.
    """
    rows = []
    all_groups = groups(grid_points(base, grid))
    for group in tqdm(all_groups, desc="system groups", unit="group", disable=len(all_groups) < 2):
        cfgs = [cfg for _, cfg in group]
        metrics = _system_group(cfgs, draws, image_shape, num_classes, train_size)
        for i, (p, _) in enumerate(group):
            row = {**p, "clients_per_round": cfgs[0].train.clients_per_round, "draws": draws}
            for k, v in metrics.items():
                row[f"{k}_mean"] = float(np.mean(v[i]))
                row[f"{k}_std"] = float(np.std(v[i]))
            rows.append(row)
    return rows


def _system_group(cfgs, draws, image_shape, num_classes, train_size) -> dict[str, np.ndarray]:
    """The planner metrics ``[P, draws]`` of one group's points."""
    cfg0 = cfgs[0]
    planner = experiment.planner_for(cfg0, image_shape, num_classes)
    protocol = registry.get(cfg0.algorithm)
    s = cfg0.train.clients_per_round
    counts = jnp.full((s,), train_size // cfg0.data.num_clients, jnp.float32)
    steps = local_steps(counts, cfg0.train.batch_size, cfg0.train.local_epochs)
    batch = max(1, min(draws, 2**22 // s))

    def point(v):
        plan = specialize_planner(planner, protocol, v)
        keys = jax.random.split(jax.random.key(v["seed"]), draws)
        _, metrics = jax.lax.map(lambda k: plan(k, steps, counts), keys, batch_size=batch)
        return metrics

    return jax.device_get(jax.jit(jax.vmap(point))(vector_values(cfgs)))
