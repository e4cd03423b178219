"""Fault tolerance: pre-emption, damaged checkpoints, other configs, non-finite values, extremes."""

import glob
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    CLI_ENV,
    ROOT,
    assert_learned,
    cli_command,
    final_state,
    read_metrics,
    synthetic_images,
)

from sflam_jax import train
from sflam_jax.algorithms.base import check_health
from sflam_jax.errors import CheckpointMismatchError, NonFiniteError


def _assert_same_state(a, b):
    flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), str(key))


@pytest.mark.slow
def test_killed_at_every_kind_of_point_resumes_to_the_same_run(
    reference_run, tmp_path, idx_dir, tfds_dir
):
    """SIGKILL during a round, during evaluation, mid metrics line and mid checkpoint write, one
    after the other on the same run directory; the finished run equals the uninterrupted one."""
    _, reference, _ = reference_run
    command = cli_command(tmp_path, idx_dir, tfds_dir)
    checkpoints = tmp_path / "checkpoints"
    for point, at in (("eval", 1), ("checkpoint", 2), ("metrics", 3), ("round", 4)):
        killed = command[:1] + [os.path.join(ROOT, "tests", "preempt.py"), point, str(at)]
        killed += command[3:]
        proc = subprocess.run(killed, env=CLI_ENV, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        if point == "checkpoint":
            # Round 2's files were written but never committed: round 1 stays the latest.
            assert glob.glob(str(checkpoints / "2.orbax-checkpoint-tmp*"))
            assert not (checkpoints / "2").exists() and (checkpoints / "1").exists()
        if point == "metrics":
            with open(tmp_path / "metrics.jsonl") as f:
                assert not f.read().endswith("\n"), "the torn line is not there"
        # Complete records only, one per round, each equal to the reference's.
        records = read_metrics(tmp_path)
        assert [r["round"] for r in records] == list(range(len(records)))
        assert records == read_metrics(reference)[: len(records)]
    subprocess.run(command, env=CLI_ENV, check=True, capture_output=True)
    with open(tmp_path / "metrics.jsonl") as a, open(os.path.join(reference, "metrics.jsonl")) as b:
        assert a.read() == b.read()
    _assert_same_state(final_state(tmp_path), final_state(reference))


def _damage_truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _damage_flip(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        f.seek(0)
        f.write(data)


def _largest_file(directory):
    files = [p for p in glob.glob(f"{directory}/**/*", recursive=True) if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


# A failed restore leaves TensorStore read futures that report their error when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    ("damage", "item"),
    [(_damage_truncate, "state"), (_damage_flip, "state"), (_damage_truncate, "meta")],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    reference_run, tmp_path, damage, item, caplog
):
    cfg, reference, _ = reference_run
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    damage(_largest_file(tmp_path / "checkpoints" / "4" / item))
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert "checkpoint of round 4" in caplog.text and "damaged" in caplog.text
    assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 1
    # Round 4 was trained again from round 3's checkpoint, to the same result.
    assert read_metrics(tmp_path) == read_metrics(reference)
    _assert_same_state(final_state(tmp_path), final_state(reference))


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("model.cut_layer", 2, "model.cut_layer is 1 there and 2 here"),
        ("model.preset", "mini", "model.preset is 'tiny' there and 'mini' here"),
        ("data.num_clients", 9, "data.num_clients is 8 there and 9 here"),
        ("optimizer.learning_rate", 0.01, "optimizer.learning_rate is 0.05 there"),
    ],
)
def test_checkpoint_of_another_config_is_refused(reference_run, tmp_path, field, value, shown):
    cfg, reference, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    other = cfg.copy_and_resolve_references()
    section, leaf = field.split(".")
    other[section][leaf] = value
    other.num_rounds = 1
    with pytest.raises(CheckpointMismatchError, match=shown) as info:
        train.train_and_evaluate(other, workdir)
    assert "--fresh" in str(info.value)
    # Nothing of the old run was touched.
    assert read_metrics(workdir) == read_metrics(reference)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["cut_layer"] == cfg.model.cut_layer


def test_fresh_start_discards_the_old_run(reference_run, tmp_path):
    cfg, reference, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    other = cfg.copy_and_resolve_references()
    other.model.cut_layer, other.num_rounds = 2, 1
    record = train.train_and_evaluate(other, workdir, fresh=True)
    records = read_metrics(workdir)
    assert [r["round"] for r in records] == [0, 1] and records[-1] == record
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]


def test_mismatch_and_typos_stop_the_cli_with_a_message(reference_run, tmp_path, idx_dir, tfds_dir):
    _, reference, _ = reference_run
    shutil.copytree(reference, tmp_path / "run")
    command = cli_command(tmp_path / "run", idx_dir, tfds_dir, "--config.model.cut_layer=2")
    proc = subprocess.run(command, env=CLI_ENV, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "sflam_jax: the checkpoint of round 4" in proc.stderr
    assert "model.cut_layer is 1 there and 2 here" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        cli_command(tmp_path / "typo", idx_dir, tfds_dir, "--config.train.btach_size=4"),
        env=CLI_ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "batch_size" in proc.stderr and "btach_size" in proc.stderr
    assert not os.path.exists(tmp_path / "typo" / "metrics.jsonl")


# -- non-finite values --------------------------------------------------------------------------


def test_health_check_names_the_round_and_the_client_or_server():
    ok = np.ones((3, 4), bool)
    check_health(ok, [7, 3, 5, 1], 2)
    bad = ok.copy()
    bad[:, 1] = False
    bad[1, 3] = False
    with pytest.raises(NonFiniteError, match=r"round 6: client 3 produced a non-finite loss and "):
        check_health(bad, [7, 3, 5, 1], 6)
    with pytest.raises(NonFiniteError, match=r"also clients 1"):
        check_health(bad, [7, 3, 5, 1], 6)
    server = ok.copy()
    server[2, 2] = False
    with pytest.raises(NonFiniteError, match=r"round 1: the server \(its segment for client 5\)"):
        check_health(server, [7, 3, 5, 1], 1)


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config
    # Learning rate far past stability: the loss overflows within a few rounds.
    cfg.optimizer.learning_rate, cfg.num_rounds = 30.0, 6
    with pytest.raises(NonFiniteError, match=r"round (\d+): (client|the server)") as info:
        train.train_and_evaluate(cfg, str(tmp_path))
    bad_round = int(str(info.value).split(":")[0].split()[-1])
    assert bad_round >= 2, "diverged in round 1: nothing to keep, pick a smaller learning rate"
    records = read_metrics(tmp_path)
    assert [r["round"] for r in records] == list(range(bad_round))
    state = final_state(tmp_path, bad_round - 1)
    assert all(np.isfinite(np.asarray(x)).all() for x in ocp.tree.to_flat_dict(state).values())
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))[-1] == bad_round - 1


# -- extreme but legal settings -----------------------------------------------------------------


def _run_one_round(cfg, workdir, **fields):
    cfg = cfg.copy_and_resolve_references()
    cfg.num_rounds = 1
    for field, value in fields.items():
        section, leaf = field.split("__")
        cfg[section][leaf] = value
    return train.train_and_evaluate(cfg, str(workdir))


def test_two_bit_cut_layer_trains(tiny_config, tmp_path):
    record = _run_one_round(tiny_config, tmp_path, quant__up_bits=2, quant__down_bits=2)
    assert record["bits_mean"] == 2
    assert_learned(tmp_path)


def test_a_single_client(tiny_config, tmp_path):
    record = _run_one_round(tiny_config, tmp_path, data__num_clients=1, train__clients_per_round=1)
    assert record["samples"] == 240 and record["clients"] == [0]


def test_one_sample_per_client(tiny_config, tmp_path):
    record = _run_one_round(
        tiny_config,
        tmp_path,
        data__num_clients=240,
        data__partition="iid",
        train__clients_per_round=5,
        train__batch_size=1,
    )
    assert record["samples"] == 5
    assert_learned(tmp_path)


def test_clients_without_samples_take_no_steps(tiny_config, tmp_path):
    from sflam_jax.data.partition import partition

    cfg = tiny_config
    cfg.data.alpha, cfg.data.min_client_samples = 0.01, 0
    cfg.train.clients_per_round = cfg.data.num_clients
    _, labels = synthetic_images(240, 14, 4, 0)  # the idx_dir fixture's training labels
    sizes = [len(p) for p in partition(labels, cfg.data, cfg.seed)]
    assert 0 in sizes, "the test needs an empty client"
    record = _run_one_round(cfg, tmp_path)
    assert record["samples"] == 240
    assert_learned(tmp_path)


def test_batch_larger_than_any_client_is_rejected(tiny_config, tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size=100 is invalid: exceeds the largest"):
        _run_one_round(tiny_config, tmp_path, train__batch_size=100)
