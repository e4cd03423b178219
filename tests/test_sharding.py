"""The mesh, the parameter layout, the host-streamed round and several processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import CLI_ENV, ROOT, final_state, read_metrics

from sflam_jax import sharding, streaming
from sflam_jax.config import base_config
from sflam_jax.data.batches import HostClients, client_table
from sflam_jax.errors import ConfigError
from sflam_jax.validation import validate

MESHES = ("8x1", "4x2", "2x4", "1x8")


def _mesh_states(tmp_path, idx_dir, tfds_dir, devices, meshes):
    out = tmp_path / f"states_{devices}.npz"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "mesh_check.py"), str(devices), str(out)]
        + [idx_dir, tfds_dir, *meshes],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    layouts = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return dict(np.load(out)), {entry.pop("mesh"): entry for entry in layouts}


@pytest.mark.slow
def test_sharded_rounds_equal_the_single_device_round(tmp_path, idx_dir, tfds_dir):
    """Two rounds on 8 fake CPU devices, for four meshes, against one
    device (1x1 in the same 8-device process); the server segment is laid out by the rules."""
    states, layouts = _mesh_states(tmp_path, idx_dir, tfds_dir, 8, ("1x1", *MESHES))
    reference = {k.split("/", 1)[1]: v for k, v in states.items() if k.startswith("1x1/")}
    assert layouts["1x1"]["devices"] == 1
    for mesh in MESHES:
        assert layouts[mesh]["devices"] == 8
        for name, want in reference.items():
            got = states[f"{mesh}/{name}"]
            if want.dtype.kind in "iu":
                np.testing.assert_array_equal(got, want, f"{mesh} {name}")
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{mesh} {name}")
        model = int(mesh.split("x")[1][0])
        placed = layouts[mesh]
        # The rules split attention heads and the MLP width over "model"; the rest is replicated.
        mlp_in = placed["['block_1']['mlp_in']['kernel']"]
        assert mlp_in["spec"] == [None, "model"]
        assert mlp_in["shard"] == [mlp_in["shape"][0], mlp_in["shape"][1] // model]
        query = placed["['block_1']['attention']['query']['kernel']"]
        assert query["shard"] == [query["shape"][0], query["shape"][1] // model]
        out = placed["['block_1']['attention']['out']['kernel']"]
        assert out["spec"] == ["model", None]
        assert out["shard"] == [out["shape"][0] // model, out["shape"][1]]
        norm = placed["['block_1']['norm1']['scale']"]
        assert norm["shard"] == norm["shape"]
        head = placed["['head']['classifier']['kernel']"]
        assert head["shard"] == head["shape"]
    # The rounds did train: the state moved away from the initial one between meshes' runs.
    assert np.all(np.isfinite(reference["metrics/train_loss"]))


# -- host-side pieces ---------------------------------------------------------------------------


def test_each_process_owns_a_contiguous_share_of_the_clients():
    owners = streaming.owner_of(10, 3)
    np.testing.assert_array_equal(owners, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    shares = [streaming.owned_clients(10, 3, p) for p in range(3)]
    np.testing.assert_array_equal(np.sum(shares, axis=0), np.ones(10))


def test_arrange_puts_each_sampled_client_in_one_slot_of_its_owner():
    rng = np.random.default_rng(0)
    owners = streaming.owner_of(40, 2)
    columns = [np.arange(0, 4), np.arange(4, 8)]
    for _ in range(20):
        sampled = rng.choice(40, 13, replace=False)
        slots = streaming.arrange(sampled, owners, columns, 8)
        flat = slots.reshape(-1)
        np.testing.assert_array_equal(np.sort(flat[flat >= 0]), np.arange(13))
        for p, cols in enumerate(columns):
            held = slots[:, cols]
            assert np.all(owners[sampled[held[held >= 0]]] == p)
        by_process = [np.sum(owners[sampled] == p) for p in range(2)]
        assert slots.shape[0] == max(-(-n // 4) for n in by_process)
    # One process: sampling order, then empty slots.
    one = streaming.arrange(np.arange(5), np.zeros(5, np.int32), [np.arange(4)], 4)
    np.testing.assert_array_equal(one, [[0, 1, 2, 3], [4, -1, -1, -1]])


def test_host_clients_keep_only_their_share_and_gather_rows():
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1)
    labels = np.arange(20) % 3
    parts = [np.array([3, 1]), np.array([0, 5, 7]), np.array([2, 4, 6, 8])]
    host = HostClients.create(images, labels, parts, 2, owned=[True, False, True])
    assert sorted(host.images.reshape(-1).tolist()) == [1, 2, 3, 4, 6, 8]
    rows = host.rows(np.array([[2, 0]]), np.array([[4, 2]]))
    index, _ = client_table(parts, 2)
    assert rows.images.shape == (1, 2, index.shape[1], 1, 1, 1)
    np.testing.assert_array_equal(rows.images[0, 0, :, 0, 0, 0], [2, 4, 6, 8])
    np.testing.assert_array_equal(rows.images[0, 1, :, 0, 0, 0], [3, 1, 0, 0])
    np.testing.assert_array_equal(rows.labels[0, 1], [0, 1, 0, 0])
    empty = host.rows(np.array([1]), np.array([0]))  # an empty slot may name any client
    assert not empty.images.any()
    with pytest.raises(ValueError, match="client 1's samples are held by another process"):
        host.rows(np.array([1]), np.array([3]))


def test_mesh_errors_name_the_field():
    cfg = base_config()
    cfg.sharding.model = 3
    with pytest.raises(ConfigError, match="sharding.model=3"):
        sharding.make_mesh(cfg.sharding, jax.devices() * 2)
    cfg.sharding.model, cfg.sharding.clients = 1, 4
    with pytest.raises(ConfigError, match=r"sharding.clients=4 .* exceeds the 1 devices"):
        sharding.make_mesh(cfg.sharding)
    cfg.sharding.clients = 0
    cfg.sharding.rules = (("mlp", "tensor"),)
    with pytest.raises(ConfigError, match="sharding.rules"):
        validate(cfg)
    cfg.sharding.rules = (("mlp", "model"),)
    cfg.algorithm, cfg.train.stream = "sl", True
    with pytest.raises(ConfigError, match="algorithm='sl'"):
        validate(cfg)


def test_cpu_devices_after_the_backend_started_is_refused_unless_it_matches():
    """This process's backend is running: asking for its own device count is fine, another is a
    ConfigError naming the field (the two-process test applies the field in fresh processes)."""
    cfg = base_config()
    have = len(jax.devices("cpu"))
    cfg.sharding.cpu_devices = have
    sharding.set_cpu_devices(cfg.sharding)
    cfg.sharding.cpu_devices = have + 1
    with pytest.raises(ConfigError, match=f"sharding.cpu_devices={have + 1} cannot be applied"):
        sharding.set_cpu_devices(cfg.sharding)
    cfg.sharding.cpu_devices = -1
    with pytest.raises(ConfigError, match="sharding.cpu_devices=-1"):
        validate(cfg)


# -- several processes --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, idx_dir, tfds_dir):
    """Two local CPU processes (jax.distributed over gloo) with two devices each
    (``sharding.cpu_devices``), on a 2x2 mesh whose "model" axis splits the server segment inside
    each process, each process holding half of the clients' samples, train the same run as one
    single-device process; only process 0 writes the metrics, and the checkpoint (gathered across
    processes) restores on one device."""
    common = [
        sys.executable,
        "-m",
        "sflam_jax.main",
        f"--config={ROOT}/configs/tiny.py",
        f"--config.data.idx_dir={idx_dir}",
        f"--config.data.data_dir={tfds_dir}",
        "--config.num_rounds=2",
        "--config.checkpoint.every=1",
        "--config.data.num_clients=16",
        "--config.train.clients_per_round=8",
        "--config.quant.up_bits=4",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([*common, f"--workdir={one}"], check=True, env=CLI_ENV, capture_output=True)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                *common,
                f"--workdir={two}",
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.sharding.model=2",
                "--config.sharding.cpu_devices=2",
            ],
            env={**CLI_ENV, "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert "process 0 of 2 holds 8 of 16 clients" in logs[0]
    assert "process 1 of 2 holds 8 of 16 clients" in logs[1]
    held = [int(log.split("clients (")[1].split()[0]) for log in logs]
    assert sum(held) == 240  # the synthetic training set, split between the processes

    want, got = read_metrics(one), read_metrics(two)
    assert [r["round"] for r in got] == [0, 1, 2]
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key == "computed_client_steps":
                # Each process queues its own clients on its own lanes: another schedule.
                assert b[key] >= b["useful_client_steps"]
                continue
            np.testing.assert_allclose(b[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    state_one = final_state(str(one), 2)
    state_two = final_state(str(two), 2, like=state_one)
    for a, b in zip(jax.tree.leaves(state_one), jax.tree.leaves(state_two), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)
