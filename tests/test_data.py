import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_images, write_idx, write_idx_dir

from sflam_jax.config import base_config
from sflam_jax.data import batches, datasets, partition
from sflam_jax.errors import ConfigError


def test_idx_directory_through_the_tfds_builder(idx_dir, tfds_dir):
    ds = datasets.load_idx_directory(idx_dir, tfds_dir)
    tr_x, tr_y = synthetic_images(240, 14, 4, 0)
    te_x, te_y = synthetic_images(80, 14, 4, 1)
    np.testing.assert_array_equal(ds.train_images, tr_x[..., None])
    np.testing.assert_array_equal(ds.train_labels, tr_y)
    np.testing.assert_array_equal(ds.test_images, te_x[..., None])
    np.testing.assert_array_equal(ds.test_labels, te_y)
    assert ds.num_classes == 4 and ds.image_shape == (14, 14, 1)
    assert os.path.isdir(os.path.join(tfds_dir, "idx_images"))


def test_uncompressed_idx_and_colour_images(tmp_path, tfds_dir):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (6, 4, 4, 3)).astype(np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2], np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte"), x, compress=False)
        write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte"), y, compress=False)
    ds = datasets.load_idx_directory(str(tmp_path), tfds_dir)
    np.testing.assert_array_equal(ds.train_images, x)
    assert ds.num_classes == 3


def test_missing_directory_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.idx_dir=.*not a directory"):
        datasets.read_idx_directory(str(tmp_path / "nope"))


def test_missing_file(tmp_path):
    write_idx_dir(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        datasets.read_idx_directory(str(tmp_path))


def test_truncated_file(tmp_path):
    write_idx_dir(str(tmp_path))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    import gzip

    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        datasets.read_idx_directory(str(tmp_path))
    # A cut gzip stream is reported too.
    path.write_bytes(gzip.compress(raw)[:500])
    with pytest.raises(ValueError, match="truncated"):
        datasets.read_idx_directory(str(tmp_path))


def test_image_label_count_mismatch(tmp_path):
    write_idx_dir(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(239, np.uint8))
    with pytest.raises(ValueError, match="train split has 240 images but 239 labels"):
        datasets.read_idx_directory(str(tmp_path))


def test_not_an_idx_file(tmp_path):
    write_idx_dir(str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(ValueError, match="t10k-images"):
        datasets.read_idx_directory(str(tmp_path))


@pytest.mark.skipif(
    not os.path.isdir(datasets.DEBIAN_FASHION_MNIST),
    reason="needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)",
)
def test_default_config_finds_debian_fashion_mnist(tfds_dir):
    cfg = base_config().data
    cfg.data_dir = tfds_dir
    ds = datasets.load_dataset(cfg)
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10


def test_tfds_by_name_reads_a_prepared_dataset(tmp_path):
    """The named-TFDS path, on a small registered builder prepared offline."""
    import tfds_fixture  # noqa: F401  (registers tiny_named_images)

    with pytest.raises(ValueError, match="data.name='tiny_named_images' is not prepared"):
        datasets.load_tfds("tiny_named_images", str(tmp_path), download=False)
    ds = datasets.load_tfds("tiny_named_images", str(tmp_path), download=True)
    assert ds.train_images.shape == (5, 4, 4, 3) and ds.num_classes == 2
    assert sorted(ds.train_images[:, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4]
    # Prepared now: found without downloading.
    again = datasets.load_tfds("tiny_named_images", str(tmp_path), download=False)
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)


# -- partition -------------------------------------------------------------------------------


def test_dirichlet_partition_assigns_every_sample_once():
    labels = np.repeat(np.arange(10), 100)
    parts = partition.dirichlet_partition(labels, 20, 0.5, seed=3, min_samples=5)
    assert len(parts) == 20
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(1000))
    assert min(len(p) for p in parts) >= 5
    again = partition.dirichlet_partition(labels, 20, 0.5, seed=3, min_samples=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_skew_follows_alpha():
    labels = np.repeat(np.arange(10), 500)

    def mean_classes_per_client(alpha):
        parts = partition.dirichlet_partition(labels, 20, alpha, seed=0)
        return np.mean([(np.bincount(labels[p], minlength=10) > 5).sum() for p in parts])

    assert mean_classes_per_client(0.1) < mean_classes_per_client(100.0)
    assert mean_classes_per_client(100.0) == 10


def test_partition_errors_name_the_field():
    labels = np.repeat(np.arange(2), 5)
    with pytest.raises(ValueError, match="data.num_clients=20"):
        partition.dirichlet_partition(labels, 20, 0.5, seed=0)
    with pytest.raises(ValueError, match="data.alpha=0"):
        partition.dirichlet_partition(labels, 2, 0.0, seed=0)
    with pytest.raises(ValueError, match="data.min_client_samples=5"):
        partition.dirichlet_partition(labels, 2, 0.01, seed=0, min_samples=5, max_tries=3)


def test_iid_partition_sizes():
    parts = partition.iid_partition(np.zeros(103), 10, seed=0)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))


# -- batches ---------------------------------------------------------------------------------


def test_client_batches_visit_each_sample_once_per_epoch():
    labels = np.arange(50) % 7
    parts = [np.arange(0, 13), np.arange(13, 50)]
    data = batches.make_client_data(np.zeros((50, 2, 2, 1), np.uint8), labels, parts, 5)
    assert data.index.shape == (2, 40)
    orders = batches.epoch_orders(jax.random.key(0), jnp.int32(13), 40, 2)
    tau = int(batches.local_steps(jnp.int32(13), 5, 2))
    assert tau == 6
    seen = []
    for step in range(tau + 2):
        rows = batches.gather_rows(data, jnp.asarray([0]))
        one = jax.tree.map(lambda x: x[0], rows)
        _, y, mask = batches.client_batch(one, jnp.int32(13), orders, step, 5)
        seen.append(np.asarray(y)[np.asarray(mask)])
        expected = [5, 5, 3, 5, 5, 3, 0, 0][step]
        assert int(mask.sum()) == expected
    first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:6])
    np.testing.assert_array_equal(np.sort(first), np.sort(labels[:13]))
    np.testing.assert_array_equal(np.sort(second), np.sort(labels[:13]))
    assert not np.array_equal(first, second)  # a new shuffle each epoch


def test_preprocess_normalises_and_resizes():
    x = jnp.full((2, 4, 4, 1), 255, jnp.uint8)
    out = batches.preprocess(x, (0.5,), (0.25,), 8)
    assert out.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(out, 2.0)


def test_test_samples_keeps_the_first_test_images(tiny_config):
    from sflam_jax import experiment
    from sflam_jax.data.datasets import load_dataset

    full = load_dataset(tiny_config.data)
    tiny_config.data.test_samples = 30
    exp = experiment.build_experiment(tiny_config)
    np.testing.assert_array_equal(exp.dataset.test_images, full.test_images[:30])
    np.testing.assert_array_equal(exp.dataset.test_labels, full.test_labels[:30])
    np.testing.assert_array_equal(exp.dataset.train_labels, full.train_labels)
    tiny_config.data.test_samples = len(full.test_labels) + 1
    with pytest.raises(ConfigError, match=f"data.test_samples={len(full.test_labels) + 1} is"):
        experiment.build_experiment(tiny_config)
