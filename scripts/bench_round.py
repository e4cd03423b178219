"""One SFL-V1 training round several ways, side by side, on any backend (ratios within one run).

    python scripts/bench_round.py [--sizes 8,32,128,256,1024] [--out results/bench/round_cpu.json]
        [--engines jit_chunked,...] [--preset ti16 --patch-size 7] [--hetero]

``--hetero`` runs the workload users run instead: the default config's non-IID clients (a
Dirichlet(0.5) partition of K = 50 clients, or K = 1,024 when S > 50, sizes differing tenfold),
one local epoch, and reports useful client steps per second (``sum_k tau_k`` over round time) with
the share of computed steps that were useful, for the jitted round under both schedules
(``jit_chunked``: fixed chunks; ``jit_lanes``: the lanes schedule), the Python-driven steps and
PyTorch; defaults ``--sizes 10,50 --out results/bench/round_hetero_cpu.json``.

Same ViT split (the default config's "mini" ViT, cut after the embedding, float matmuls), same
Fashion-MNIST data (K = 1,024 IID clients of about 58 samples, batch 32, one epoch: 2 client steps
each), same protocol (SFL-V1 with the 8-bit stochastic uplink quantizer, SGD with momentum, FedAvg):

- ``jit_chunked``: the jitted round, clients vmapped 16 at a time (``train.chunk_size = 16``,
  ``train.schedule = "chunks"``);
- ``jit_lanes``: the jitted round with the lanes schedule (``train.schedule = "lanes"``), its lane
  count chosen by the engine (``train.chunk_size = 0``);
- ``jit_chunked_cores`` (CPU only): the same round on one XLA CPU device per core
  (``sharding.cpu_devices``), each chunk's client axis split over them by the run's mesh, as it
  would be over the GPUs of a host;
- ``jit_unchunked``: the jitted round, all S clients vmapped at once (up to ``--max-unchunked``);
- ``python_steps``: the same JAX code driven client by client from Python, one jitted call per
  client step (plus small jitted calls to gather a client's rows and add it to FedAvg);
- ``torch_sequential``: PyTorch (transformers' ViT, split at the same place), clients one after
  another with deep-copied segments, as the published SplitFed / SFLAM code runs them.

Each engine runs in its own process with the same allocator settings (glibc
malloc otherwise maps and unmaps XLA's buffers on every call). For each S it reports client steps
per second (median of ``--rounds`` rounds after one warm-up round), the warm-up round's extra time
(compilation for JAX), the process's peak resident memory so far, and the achieved FLOP/s: XLA's
FLOP count of one client step times steps per second, against a dense float32 matmul measured in
the same run. Two ceilings come from the same run: a dense float32 2048^3 matmul (what the issue
measures against) and the model's own matmuls at their shapes (every dense layer and attention
product of a client step, forward and backward, batched over a chunk of clients, each timed
alone): no schedule of the step can beat the second. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import resource
import subprocess
import sys
import time
import types

import numpy as np
from benchlib import machine, matmul_flops_per_s, matmul_seconds

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ENGINES = (
    "jit_chunked",
    "jit_lanes",
    "jit_chunked_cores",
    "jit_unchunked",
    "python_steps",
    "torch_sequential",
)
HETERO_ENGINES = ("jit_chunked", "jit_lanes", "python_steps", "torch_sequential")
MALLOC_ENV = {
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}
NUM_CLIENTS = 1024
CHUNK = int(os.environ.get("BENCH_CHUNK", 16))  # clients per chunk of jit_chunked
# The model: the default config's "mini" ViT unless --preset / --patch-size say otherwise.
PRESET = os.environ.get("BENCH_PRESET", "mini")
PATCH = int(os.environ.get("BENCH_PATCH", 0))  # 0 = the preset's
HETERO = os.environ.get("BENCH_HETERO", "") == "1"  # the default config's non-IID clients


def bench_config(clients_per_round: int, chunk_size: int, schedule: str = "chunks"):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import default

    c = default.get_config()
    if HETERO:
        # The default config's Dirichlet partition (K = 50), or K = 1,024 for larger S.
        c.data.num_clients = max(c.data.num_clients, NUM_CLIENTS if clients_per_round > 50 else 0)
    else:
        c.data.num_clients = NUM_CLIENTS
        c.data.partition = "iid"
    c.aqt.enabled = False  # PyTorch has no AQT; every engine runs float matmuls
    c.model.preset, c.model.patch_size = PRESET, PATCH
    c.train.clients_per_round = clients_per_round
    c.train.chunk_size = chunk_size
    c.train.schedule = schedule
    c.metrics.progress = False
    return c


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_rounds(run_round, rounds: int) -> tuple[float, list[float]]:
    """``(warm-up round s, [timed round s])``; ``run_round(r)`` must block until done."""
    t0 = time.perf_counter()
    run_round(0)
    first = time.perf_counter() - t0
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        run_round(r)
        times.append(time.perf_counter() - t0)
    return first, times


def timing_row(s: int, first: float, times: list[float], steps: list[int]) -> dict:
    """A result row: useful client steps over the timed rounds' total time (the rounds sample
    other clients, so their step counts differ), the median round and the warm-up extra."""
    return {
        "clients_per_round": s,
        "first_round_s": first,
        "round_s": float(np.median(times)),
        "steps": int(np.sum(steps)),
        "seconds": float(np.sum(times)),
    }


# -- JAX engines ---------------------------------------------------------------------------------


def jax_setup():
    from sflam_jax.data.datasets import load_dataset

    return load_dataset(bench_config(8, 0).data)


def client_steps(run, clients) -> int:
    """Local steps of the sampled clients (tau_k summed)."""
    from sflam_jax.data.batches import local_steps

    cfg = run.config
    counts = np.asarray([len(run.parts[k]) for k in clients])
    return int(np.sum(local_steps(counts, cfg.train.batch_size, cfg.train.local_epochs)))


def engine_jit(
    sizes, rounds, chunked: bool, max_unchunked: int, per_core: bool = False, lanes: bool = False
):
    import jax

    from sflam_jax import experiment, sharding

    if per_core:
        # Before anything starts the backend; a no-op off the CPU, where the engine is skipped.
        sharding.set_cpu_devices(types.SimpleNamespace(cpu_devices=os.cpu_count()))
        if jax.default_backend() != "cpu":
            return
    dataset = jax_setup()
    for s in sizes:
        if not chunked and s > max_unchunked:
            continue
        if lanes:
            cfg = bench_config(s, 0, "lanes")
        else:
            cfg = bench_config(s, min(CHUNK, s) if chunked else 0)
        run = experiment.build_run(cfg, dataset)
        box = {"state": run.initial}
        sampled, computed = [], []

        def one(r, run=run, box=box, sampled=sampled, computed=computed):
            box["state"], metrics = run.round_fn(box["state"], r)
            jax.block_until_ready(box["state"])
            sampled.append(np.asarray(metrics["clients"]))
            computed.append(int(metrics["computed_client_steps"]))

        first, times = timed_rounds(one, rounds)
        steps = [client_steps(run, c) for c in sampled[1:]]
        row = timing_row(s, first, times, steps)
        row.update(lanes=run.engine.chunk, useful_share=row["steps"] / float(np.sum(computed[1:])))
        yield row


def engine_python_steps(sizes, rounds):
    from sflam_jax import experiment

    dataset = jax_setup()
    for s in sizes:
        run = experiment.build_run(bench_config(s, 0), dataset)
        sampled = []
        first, times = timed_rounds(python_driven_round(run, dataset, sampled), rounds)
        yield timing_row(s, first, times, [client_steps(run, c) for c in sampled[1:]])


def python_driven_round(run, dataset, sampled: list):
    """``round(r)``: the run's protocol driven from Python, one jitted call per client step."""
    import jax
    import jax.numpy as jnp

    from sflam_jax import streams
    from sflam_jax.algorithms.base import weighted_sum
    from sflam_jax.data.batches import epoch_orders, gather_rows, local_steps, make_client_data

    engine, cfg = run.engine, run.config
    alg = engine.algorithm
    data = make_client_data(
        dataset.train_images, dataset.train_labels, run.parts, cfg.train.batch_size
    )
    plan_fn = jax.jit(
        lambda counts, r: engine.round_plan(
            counts, streams.round_key(cfg.seed, r), cfg.quant.up_bits
        )
    )
    step = jax.jit(alg.client_step)

    @jax.jit
    def start(state, data, client, count, key):
        rows = jax.tree.map(lambda x: x[0], gather_rows(data, client[None]))
        order_key, step_key = jax.random.split(key)
        orders = epoch_orders(order_key, count, rows.labels.shape[0], cfg.train.local_epochs)
        return alg.start_carry(state.params_c, state.params_s), rows, orders, step_key

    @jax.jit
    def add(sums, carry, count):
        one = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
        w = count.astype(jnp.float32)[None]
        sum_c, sum_s, stats, weight, *rest = sums
        return (
            jax.tree.map(jnp.add, sum_c, weighted_sum(one(carry[0]), w)),
            jax.tree.map(jnp.add, sum_s, weighted_sum(one(carry[1]), w)),
            stats + carry[4],
            weight + w[0],
            *rest,
        )

    average = jax.jit(engine.average)
    box = {"state": run.initial}

    def one_round(r):
        plan, _ = plan_fn(data.counts, np.int32(r))
        plan = jax.device_get(plan)
        state = box["state"]
        sums = engine.empty_sums(state)
        for i in range(len(plan["clients"])):
            count = plan["counts"][i]
            carry, rows, orders, step_key = start(
                state, data, plan["clients"][i], count, plan["keys"][i]
            )
            tau = int(local_steps(count, cfg.train.batch_size, cfg.train.local_epochs))
            for t in range(tau):
                carry = step(carry, rows, count, orders, plan["up_bits"][i], step_key, t)
            sums = add(sums, carry, count)
        params_c, params_s, _ = average(state, sums)
        box["state"] = state.replace(params_c=params_c, params_s=params_s)
        jax.block_until_ready(box["state"])
        sampled.append(plan["clients"])

    return one_round


def step_flops() -> float:
    """XLA's FLOP count of one client step (one client, one batch) of the benchmark's model."""
    import jax
    import jax.numpy as jnp

    from sflam_jax import experiment
    from sflam_jax.data.batches import ClientRows, epoch_orders

    run = experiment.build_experiment(bench_config(8, 0), jax_setup())
    alg = run.engine.algorithm
    width = 64
    rows = ClientRows(
        images=jnp.zeros((width, 28, 28, 1), jnp.uint8), labels=jnp.zeros((width,), jnp.int32)
    )
    carry = alg.start_carry(run.initial.params_c, run.initial.params_s)
    orders = epoch_orders(jax.random.key(0), jnp.int32(width), width, 1)
    args = (carry, rows, jnp.int32(width), orders, jnp.float32(8), jax.random.key(1), 0)
    analysis = jax.jit(alg.client_step).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis["flops"])


def model_matmuls(cfg, chunk: int) -> dict[tuple, int]:
    """The matmuls of one chunk's client step: ``{(batch, M, K, N): how many}``.

    Every dense layer (rows ``[B * tokens]``) and both attention products (batched over samples
    and heads), forward and backward (input and weight gradients; the first layer has no input
    gradient), each batched over the ``chunk`` clients whose copies differ.
    """
    from sflam_jax.models.vit import vit_config

    v = vit_config(
        cfg.model.preset,
        image_size=28,
        channels=1,
        num_classes=10,
        patch_size=cfg.model.patch_size or None,
    )
    b, t, d, m = cfg.train.batch_size, v.num_tokens, v.hidden_size, v.mlp_dim
    hd = d // v.num_heads
    out: collections.Counter = collections.Counter()

    def dense(rows, k, n, input_grad=True):
        for shape in [(rows, k, n), (k, rows, n)] + ([(rows, n, k)] if input_grad else []):
            out[((chunk,), *shape)] += 1

    def product(m_, k, n, times):
        out[((chunk, b * v.num_heads), m_, k, n)] += times

    dense(b * v.num_patches, v.patch_size**2, d, input_grad=False)
    for _ in range(v.depth):
        for _ in range(4):  # query, key, value, out
            dense(b * t, d, d)
        dense(b * t, d, m)
        dense(b * t, m, d)
        product(t, hd, t, 2)  # scores and the gradient of the mixing weights
        product(t, t, hd, 4)  # mixing, and the gradients of queries, keys and values
    dense(b, d, 10)
    return dict(out)


def model_matmul_flops_per_s(cfg, chunk: int, repeats: int = 20) -> tuple[float, float]:
    """``(FLOPs of the step's matmuls for one client, their FLOP/s)``, each matmul timed alone
    (median of ``repeats``) at its shape; the FLOP/s are summed FLOPs over summed times."""
    flops = seconds = 0.0
    for (batch, m, k, n), times in model_matmuls(cfg, chunk).items():
        flops += times * 2.0 * np.prod(batch) * m * k * n
        seconds += times * matmul_seconds((*batch, m, k), (*batch, k, n), repeats)
    return flops / chunk, flops / seconds


# -- PyTorch engine ------------------------------------------------------------------------------


def engine_torch(sizes, rounds):
    import jax
    import torch
    import transformers

    from sflam_jax.algorithms.base import sample_clients
    from sflam_jax.data.batches import local_steps
    from sflam_jax.data.datasets import load_dataset
    from sflam_jax.data.partition import partition
    from sflam_jax.models.vit import PRESETS
    from sflam_jax.streams import round_key

    cfg = bench_config(8, 0)
    dataset = load_dataset(cfg.data)
    hidden, depth, heads, mlp, patch = PRESETS[cfg.model.preset]
    patch = cfg.model.patch_size or patch
    torch.manual_seed(cfg.seed)
    model = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=mlp,
            image_size=28,
            patch_size=patch,
            num_channels=1,
            num_labels=10,
            layer_norm_eps=cfg.model.layer_norm_eps,
            hidden_act="gelu",
        )
    )
    cut = cfg.model.cut_layer

    class Client(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.embeddings = m.vit.embeddings
            self.blocks = torch.nn.ModuleList(m.vit.layers[:cut])

        def forward(self, x):
            h = self.embeddings(x)
            for block in self.blocks:
                h = block(h)
                h = h[0] if isinstance(h, tuple) else h
            return h

    class Server(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.blocks = torch.nn.ModuleList(m.vit.layers[cut:])
            self.norm = m.vit.layernorm
            self.classifier = m.classifier

        def forward(self, h):
            for block in self.blocks:
                h = block(h)
                h = h[0] if isinstance(h, tuple) else h
            return self.classifier(self.norm(h)[:, 0])

    global_c, global_s = Client(model), Server(model)
    images = torch.from_numpy(
        (dataset.train_images.astype(np.float32) / 255.0 - 0.5) / 0.5
    ).permute(0, 3, 1, 2)
    labels = torch.from_numpy(dataset.train_labels.astype(np.int64))
    b, epochs, bits = cfg.train.batch_size, cfg.train.local_epochs, cfg.quant.up_bits
    rng = np.random.default_rng(cfg.seed)

    def quantize(a):
        """Per-sample stochastic uniform quantization (SPEC section 2)."""
        flat = a.reshape(a.shape[0], -1)
        lo = flat.min(1, keepdim=True).values
        hi = flat.max(1, keepdim=True).values
        delta = torch.where(hi > lo, (hi - lo) / (2**bits - 1), torch.ones_like(hi))
        u = ((flat - lo) / delta).clamp(0, 2**bits - 1)
        q = lo + delta * (u.floor() + (torch.rand_like(u) < u - u.floor()).float())
        return torch.minimum(torch.maximum(q, lo), hi).reshape(a.shape)

    def make_opt(params):
        return torch.optim.SGD(
            params, lr=cfg.optimizer.learning_rate, momentum=cfg.optimizer.momentum
        )

    for s in sizes:
        sampled = []
        parts = partition(dataset.train_labels, bench_config(s, 0).data, cfg.seed)

        def one_round(r, s=s, sampled=sampled, parts=parts):
            # The clients the JAX engines sample in round r.
            sample_key = jax.random.split(round_key(cfg.seed, r))[0]
            clients = np.asarray(sample_clients(sample_key, len(parts), s))
            sums_c = {k: torch.zeros_like(v) for k, v in global_c.state_dict().items()}
            sums_s = {k: torch.zeros_like(v) for k, v in global_s.state_dict().items()}
            total = 0
            for k in clients:
                client, server = copy.deepcopy(global_c), copy.deepcopy(global_s)
                opt_c, opt_s = make_opt(client.parameters()), make_opt(server.parameters())
                idx = parts[k]
                for _ in range(epochs):
                    order = rng.permutation(idx)
                    for start in range(0, len(order), b):
                        batch = torch.from_numpy(order[start : start + b])
                        smashed = client(images[batch])
                        received = quantize(smashed.detach()).requires_grad_()
                        loss = torch.nn.functional.cross_entropy(server(received), labels[batch])
                        opt_s.zero_grad()
                        loss.backward()
                        opt_s.step()
                        opt_c.zero_grad()
                        smashed.backward(received.grad)  # float downlink
                        opt_c.step()
                n = len(idx)
                total += n
                with torch.no_grad():
                    for sums, seg in ((sums_c, client), (sums_s, server)):
                        for name, v in seg.state_dict().items():
                            sums[name] += n * v
            with torch.no_grad():
                global_c.load_state_dict({k: v / total for k, v in sums_c.items()})
                global_s.load_state_dict({k: v / total for k, v in sums_s.items()})
            sampled.append(clients)

        first, times = timed_rounds(one_round, rounds)
        steps = [
            int(np.sum(local_steps(np.asarray([len(parts[k]) for k in c]), b, epochs)))
            for c in sampled[1:]
        ]
        yield timing_row(s, first, times, steps)


# -- driver --------------------------------------------------------------------------------------


def run_engine(name: str, sizes, rounds: int, max_unchunked: int):
    if name == "jit_chunked":
        rows = engine_jit(sizes, rounds, True, max_unchunked)
    elif name == "jit_lanes":
        rows = engine_jit(sizes, rounds, True, max_unchunked, lanes=True)
    elif name == "jit_unchunked":
        rows = engine_jit(sizes, rounds, False, max_unchunked)
    elif name == "python_steps":
        rows = engine_python_steps(sizes, rounds)
    elif name == "torch_sequential":
        rows = engine_torch(sizes, rounds)
    elif name == "jit_chunked_cores":
        rows = engine_jit(sizes, rounds, True, max_unchunked, per_core=True)
    elif name == "reference":
        model_flops, model_rate = model_matmul_flops_per_s(bench_config(8, 0), CHUNK)
        reference = {
            "step_flops": step_flops(),
            "matmul_flops_per_s": matmul_flops_per_s(),
            "model_matmul_flops": model_flops,
            "model_matmul_flops_per_s": model_rate,
        }
        print(json.dumps(reference))
        return
    else:
        raise SystemExit(f"unknown engine {name!r}; allowed: {ENGINES}")
    for row in rows:
        row.update(engine=name, peak_rss_mib=peak_mib())
        row["steps_per_s"] = row["steps"] / row["seconds"]
        print(json.dumps(row), flush=True)


def table(result) -> str:
    """Markdown: client steps/s, % of the two matmul ceilings, warm-up extra and peak memory."""
    ref, shaped = result["matmul_flops_per_s"], result["model_matmul_flops_per_s"]
    lines = [
        "| engine | S | useful client steps/s | useful share | achieved GFLOP/s "
        "| % of dense matmul | % of model-shape matmuls | warm-up extra s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        flops = r["steps_per_s"] * result["step_flops"]
        share = f"{100 * r['useful_share']:.0f}%" if "useful_share" in r else "100%"
        lines.append(
            f"| {r['engine']} | {r['clients_per_round']:,} | {r['steps_per_s']:.1f} | {share} "
            f"| {flops / 1e9:.1f} | {100 * flops / ref:.1f} | {100 * flops / shaped:.1f} "
            f"| {r['first_round_s'] - r['round_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,128,256,1024")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per point")
    parser.add_argument("--max-unchunked", type=int, default=256)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--preset", default=PRESET, help="models.vit preset (default: mini)")
    parser.add_argument("--patch-size", type=int, default=PATCH, help="0 = the preset's")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench", "round_cpu.json"))
    parser.add_argument("--hetero", action="store_true", help="non-IID clients of unequal size")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hetero:
        defaults = {"sizes": "8,32,128,256,1024", "engines": ",".join(ENGINES)}
        defaults["out"] = os.path.join(ROOT, "results", "bench", "round_cpu.json")
        if args.sizes == defaults["sizes"]:
            args.sizes = "10,50"
        if args.engines == defaults["engines"]:
            args.engines = ",".join(HETERO_ENGINES)
        if args.out == defaults["out"]:
            args.out = os.path.join(ROOT, "results", "bench", "round_hetero_cpu.json")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.engine:
        run_engine(args.engine, sizes, args.rounds, args.max_unchunked)
        return

    env = {
        **os.environ,
        **MALLOC_ENV,
        "PYTHONPATH": ROOT,
        "BENCH_PRESET": args.preset,
        "BENCH_PATCH": str(args.patch_size),
        "BENCH_HETERO": "1" if args.hetero else "",
    }

    def launch(name):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--engine", name, "--sizes", args.sizes]
            + ["--rounds", str(args.rounds), "--max-unchunked", str(args.max_unchunked)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        out = []
        for line in proc.stdout:
            if line.startswith("{"):
                out.append(json.loads(line))
                print(f"{name}: {line.strip()}", flush=True)
        if proc.wait():
            print(f"{name} failed:\n{proc.stderr.read()[-2000:]}", file=sys.stderr)
        return out

    reference = launch("reference")[0]
    rows = []
    for name in args.engines.split(","):
        rows += launch(name)

    import jax

    from sflam_jax.metrics import atomic_write_text

    result = {
        "machine": machine(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "num_clients": "default config's Dirichlet(0.5) K" if HETERO else NUM_CLIENTS,
        "hetero": HETERO,
        "chunk_size": CHUNK,
        "preset": args.preset,
        "patch_size": args.patch_size,
        **reference,
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    atomic_write_text(os.path.splitext(args.out)[0] + ".md", table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
