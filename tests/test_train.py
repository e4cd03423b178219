import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import CLI_ENV, assert_learned, cli_command
from conftest import read_metrics as _metrics

from sflam_jax import train
from sflam_jax.metrics import read_jsonl


def test_run_writes_metrics_checkpoints_and_learns(reference_run):
    cfg, workdir, final = reference_run
    records = _metrics(workdir)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert set(records[0]) == {"round", "test_loss", "test_accuracy"}  # the starting model
    records = records[1:]
    for r in records:
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "clients"} <= set(r)
        assert len(set(r["clients"])) == cfg.train.clients_per_round
    assert final == records[-1]
    # The synthetic classes are separable: training must get well above chance (0.25).
    assert records[-1]["test_accuracy"] > 0.6
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"
    timing = read_jsonl(os.path.join(workdir, "timing.jsonl"))
    assert [t["round"] for t in timing] == [0, 1, 2, 3, 4]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_rounds"] == 4


def test_same_config_and_seed_same_metrics(reference_run, tmp_path):
    cfg, workdir, _ = reference_run
    train.train_and_evaluate(cfg, str(tmp_path))
    with open(os.path.join(workdir, "metrics.jsonl")) as a, open(tmp_path / "metrics.jsonl") as b:
        assert a.read() == b.read()


def test_other_seed_other_metrics(reference_run, tmp_path):
    cfg, workdir, _ = reference_run
    cfg = cfg.copy_and_resolve_references()
    cfg.seed, cfg.num_rounds = 1, 1
    train.train_and_evaluate(cfg, str(tmp_path))
    assert _metrics(tmp_path)[1] != _metrics(workdir)[1]


def test_resume_continues_to_the_same_result(reference_run, tmp_path):
    cfg, workdir, _ = reference_run
    short = cfg.copy_and_resolve_references()
    short.num_rounds = 2
    train.train_and_evaluate(short, str(tmp_path))
    # A later round's line written before a crash (no checkpoint for it) must not survive.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 3, "train_loss": -1.0}) + "\n")
    train.train_and_evaluate(cfg, str(tmp_path))
    assert _metrics(tmp_path) == _metrics(workdir)
    # Running a finished run again trains nothing and reports its last round.
    assert train.train_and_evaluate(cfg, str(tmp_path)) == _metrics(workdir)[-1]
    assert _metrics(tmp_path) == _metrics(workdir)


def test_killed_cli_run_resumes_with_the_same_metrics(reference_run, tmp_path, idx_dir, tfds_dir):
    _, workdir, _ = reference_run
    command = cli_command(tmp_path, idx_dir, tfds_dir)
    env = CLI_ENV
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(_metrics(tmp_path)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(_metrics(tmp_path)) < 5, "the run was not killed mid-way"
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert _metrics(tmp_path) == _metrics(workdir)


def test_tensorboard_event_files(reference_run, tmp_path):
    cfg, _, _ = reference_run
    cfg = cfg.copy_and_resolve_references()
    cfg.num_rounds, cfg.metrics.tensorboard = 1, True
    train.train_and_evaluate(cfg, str(tmp_path))
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_chunked_clients_and_aqt_run(reference_run, tmp_path):
    cfg, workdir, _ = reference_run
    cfg = cfg.copy_and_resolve_references()
    cfg.num_rounds, cfg.train.chunk_size, cfg.aqt.enabled = 1, 2, True
    train.train_and_evaluate(cfg, str(tmp_path))
    assert_learned(tmp_path)
    # AQT's integer matmuls change the numbers: not the float reference's first round.
    assert _metrics(tmp_path)[1]["train_loss"] != _metrics(workdir)[1]["train_loss"]


@pytest.mark.parametrize(
    ("algorithm", "schedule"),
    [("sflam", "chunks"), ("sflam", "lanes"), ("esfl", "chunks"), ("sfprompt", "chunks")],
)
def test_streamed_round_equals_the_one_program_round(reference_run, tmp_path, algorithm, schedule):
    """train.stream on one process (host-held samples, several device calls per round) gives the
    one-program round's records: bit for bit with chunks (also for ESFL's planned cuts and
    SFPrompt's pruned clients); with lanes the clients finish block by block, so FedAvg adds them
    in another order (float32 rounding)."""
    cfg, _, _ = reference_run
    cfg = cfg.copy_and_resolve_references()
    cfg.num_rounds, cfg.train.chunk_size, cfg.train.schedule = 1, 2, schedule
    cfg.algorithm = algorithm
    if algorithm == "esfl":
        cfg.allocation.method = "esfl_exact"
    train.train_and_evaluate(cfg, str(tmp_path / "one_program"))
    cfg.train.stream, cfg.train.chunks_per_block = True, 1
    train.train_and_evaluate(cfg, str(tmp_path / "streamed"))
    streamed, one = _metrics(tmp_path / "streamed"), _metrics(tmp_path / "one_program")
    if schedule == "chunks":
        assert streamed == one
    for a, b in zip(streamed, one, strict=True):
        assert a.keys() == b.keys() and a.get("clients") == b.get("clients")
        for key in ("train_loss", "test_loss", "samples", "useful_client_steps"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


def test_allocation_in_the_round(reference_run, tmp_path):
    """pgd with free bits: budget met, integer bits, objective below equal bandwidth on the same
    channel draws, and the simulated clock sums the rounds' latencies."""
    cfg, workdir, _ = reference_run
    cfg = cfg.copy_and_resolve_references()
    cfg.num_rounds, cfg.eval_every = 2, 0
    cfg.allocation.method, cfg.allocation.optimize_bits = "pgd", True
    cfg.allocation.pgd_steps = 300
    train.train_and_evaluate(cfg, str(tmp_path))
    pgd_records, equal_records = _metrics(tmp_path), _metrics(workdir)[1:3]
    for p, e in zip(pgd_records, equal_records, strict=True):
        assert p["clients"] == e["clients"]
        assert p["quant_error"] <= cfg.allocation.eps_q * (1 + 1e-6)
        assert p["bits_min"] == int(p["bits_min"]) and p["bits_max"] <= cfg.allocation.bits_max
        assert p["objective"] <= e["objective"] * (1 + 1e-6)
    np.testing.assert_allclose(
        pgd_records[1]["sim_time_s"],
        pgd_records[0]["round_latency_s"] + pgd_records[1]["round_latency_s"],
        rtol=1e-6,
    )
    with open(tmp_path / "system.json") as f:
        system = json.load(f)
    assert 0 < system["sflam_device_memory_mib"] < system["fl_device_memory_mib"]


@pytest.mark.parametrize(
    "every,start_at,evaluated",
    [
        (1, 0, [0, 1, 2, 3, 4, 5]),
        (2, 0, [0, 2, 4, 5]),
        (1, 3, [3, 4, 5]),
        (2, 3, [4, 5]),
        (0, 2, [5]),
    ],
)
def test_evaluation_cadence(every, start_at, evaluated):
    """``eval_every`` and ``eval_from``: which rounds get test metrics (the last one always)."""
    seen, written = [], []

    def evaluate(state):
        seen.append(state)
        return [{"test_accuracy": 0.5}]

    train.run_rounds(
        lambda state, r: (state + 1, {train.HEALTH: None, "train_loss": 1.0}),
        0,
        0,
        5,
        num_rounds=5,
        eval_every=every,
        eval_from=start_at,
        evaluate=evaluate,
        split=lambda metrics: [metrics],
        check=lambda health, metrics, r: None,
        write=lambda records, timing: written.extend(records),
    )
    assert seen == evaluated
    assert [r["round"] for r in written if "test_accuracy" in r] == evaluated
