"""The paper's figure set: trains every protocol and sweeps the system model, then writes a PNG and
a CSV per figure and a results.md that embeds them.

    python scripts/reproduce_paper.py                      # --scale cpu into docs/results/
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
from sflam_jax.metrics import read_jsonl
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
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
    parser.add_argument("--rounds", type=int, default=0, help="0: 30 (cpu) or 100 (paper)")
    parser.add_argument("--draws", type=int, default=64, help="channel draws per system point")
    parser.add_argument(
        "--max-devices", type=int, default=10000, help="largest S of the system-model sweep"
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
    params = experiment.system_params(base)
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
