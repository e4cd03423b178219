"""Shared fixtures: a small synthetic IDX dataset on disk and the tiny config pointed at it."""

import gzip
import os
import struct
import sys
import tempfile

# One XLA compilation cache for the run, shared by both pytest-xdist workers and the CLI
# subprocesses the tests start (they inherit the environment): many tests compile the same
# tiny-config programs, and a cache hit returns the same executable, so no number changes. Set
# before JAX is imported; a variable already set wins.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"sflam_jax_tests_xla_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# Most tests run tiny programs a few times: XLA's optimisation passes cost more than they save
# (test_sflam.py: 123 s -> 89 s on 2 cores). Tests whose time is the programs' run time (the
# float64 oracles, the real-weight ViT) carry the ``optimized`` mark and compile with the passes.
# Subprocesses (the CLI, the notebooks' kernel, the meshes) inherit the setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> None:
    """Writes a uint8 array as an IDX file (the MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def synthetic_images(n: int, size: int, classes: int, seed: int):
    """Learnable images: class c lights up the c-th horizontal band, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    band = size // classes
    for i, c in enumerate(labels):
        images[i, c * band : (c + 1) * band] += 150
    return images, labels


def write_idx_dir(directory: str, n_train=240, n_test=80, size=14, classes=4, seed=0) -> str:
    os.makedirs(directory, exist_ok=True)
    tr_x, tr_y = synthetic_images(n_train, size, classes, seed)
    te_x, te_y = synthetic_images(n_test, size, classes, seed + 1)
    write_idx(os.path.join(directory, "train-images-idx3-ubyte.gz"), tr_x)
    write_idx(os.path.join(directory, "train-labels-idx1-ubyte.gz"), tr_y)
    write_idx(os.path.join(directory, "t10k-images-idx3-ubyte.gz"), te_x)
    write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"), te_y)
    return directory


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
    """XLA's optimisation passes on for tests marked ``optimized`` (see the top of this file)."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> str:
    return write_idx_dir(str(tmp_path_factory.mktemp("idx")))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def _tiny(idx_dir, tfds_dir):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny

    cfg = tiny.get_config()
    cfg.data.idx_dir = idx_dir
    cfg.data.data_dir = tfds_dir
    return cfg


@pytest.fixture
def tiny_config(idx_dir, tfds_dir):
    return _tiny(idx_dir, tfds_dir)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, idx_dir, tfds_dir):
    """An uninterrupted 4-round run of the tiny config: ``(config, workdir, last record)``."""
    from sflam_jax import train

    cfg = _tiny(idx_dir, tfds_dir)
    cfg.num_rounds = 4
    workdir = str(tmp_path_factory.mktemp("reference"))
    final = train.train_and_evaluate(cfg, workdir)
    return cfg, workdir, final


def final_state(workdir, step=4, like=None):
    """The state saved in ``workdir``'s checkpoint of round ``step``; ``like`` (a state) gives
    the placement, needed for a checkpoint written on another mesh or by several processes."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        return manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like))
        ).state
    finally:
        manager.close()


def assert_learned(workdir, improved: bool = True) -> None:
    """The run's first round trained: it moved the global model's test loss away from the
    starting model's (round 0) by more than 0.1%, and with ``improved`` lowered it (the synthetic
    classes are separable; SFL-V2's shared server can overshoot in its first round)."""
    records = read_metrics(workdir)
    assert records[0]["round"] == 0 and records[1]["round"] == 1
    before, after = records[0]["test_loss"], records[1]["test_loss"]
    assert abs(after - before) > 1e-3 * before, records[:2]
    if improved:
        assert after < before, records[:2]


def hidden_states(cfg, params: dict, images):
    """The ViT's final-norm token sequence ``[B, N + 1, D]`` (Hugging Face's
    ``last_hidden_state``): embedding, every block, the head's norm, without the classifier."""
    import flax.linen as nn

    from sflam_jax.models import vit

    x = vit.Embedding(cfg).apply({"params": params["embedding"]}, images)
    for name in vit.block_names(cfg.depth):
        x = vit.Block(cfg).apply({"params": params[name]}, x)
    return nn.LayerNorm(cfg.layer_norm_eps).apply({"params": params["head"]["norm"]}, x)


def read_metrics(workdir) -> list[dict]:
    from sflam_jax.metrics import read_jsonl

    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def cli_command(workdir, idx_dir, tfds_dir, *overrides, runner=("-m", "sflam_jax.main")):
    """The CLI command of the reference run (tiny config, 4 rounds) in ``workdir``."""
    return [
        sys.executable,
        *runner,
        f"--config={ROOT}/configs/tiny.py",
        f"--workdir={workdir}",
        "--config.num_rounds=4",
        f"--config.data.idx_dir={idx_dir}",
        f"--config.data.data_dir={tfds_dir}",
        *overrides,
    ]


CLI_ENV = {**os.environ, "PYTHONPATH": ROOT}
