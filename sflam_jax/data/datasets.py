"""Image classification data as host numpy arrays, from TFDS or from a directory of IDX files.

Two sources share one code path, a TFDS builder read through ``as_data_source`` (array_record, no
TensorFlow needed):

- ``source="tfds"``: a TFDS dataset by name (cifar10, cifar100, fashion_mnist, mnist, ...) in
  ``data_dir``; it is downloaded only when ``download=True``.
- ``source="idx"``: a directory with the four MNIST-layout IDX files
  (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
  ``t10k-labels-idx1-ubyte.gz``; ``.gz`` optional). The files are checked, then prepared once into
  ``data_dir`` by the ``IdxImages`` builder; a changed file gets a new cache entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import os
import struct

import numpy as np

from sflam_jax.errors import ConfigError, DataError, MissingDataError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held on the host.

    Attributes:
      train_images: ``[N, H, W, C]`` uint8.
      train_labels: ``[N]`` int32.
      test_images: ``[M, H, W, C]`` uint8.
      test_labels: ``[M]`` int32.
      num_classes: number of label values.
      name: where the data came from.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


# ---------------------------------------------------------------------------------------------
# IDX files


def _idx_path(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise MissingDataError(
        f"data.idx_dir={directory!r} has no {stem}.gz (or {stem}); an IDX directory needs "
        f"{', '.join(s + '.gz' for s in IDX_FILES.values())}"
    )


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (gzip or raw) into an array of its declared shape.

    Raises:
      ValueError: bad magic number, an element type other than unsigned byte, or a payload shorter
        or longer than the header declares (a truncated file).
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path!r}: {e} (truncated or not gzip?)") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path!r} is not an IDX file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise DataError(f"{path!r} holds IDX type 0x{raw[2]:02x}; only unsigned bytes are read")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path!r} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path!r} declares shape {shape} ({expected} bytes) but holds "
            f"{len(raw) - header} bytes: the file is truncated or corrupt"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _as_images(array: np.ndarray, path: str) -> np.ndarray:
    if array.ndim == 3:
        return array[..., None]
    if array.ndim == 4:
        return array
    raise DataError(f"{path!r} has {array.ndim} dimensions; image files need 3 (N, H, W) or 4")


def read_idx_directory(directory: str) -> dict[str, np.ndarray]:
    """Reads and checks the four IDX files of ``directory``.

    Returns:
      ``{"train_images", "train_labels", "test_images", "test_labels"}`` with images
      ``[N, H, W, C]`` uint8 and labels ``[N]`` uint8.

    Raises:
      FileNotFoundError: the directory or a file is missing.
      ValueError: a malformed or truncated file, image and label counts that differ, or train and
        test images of different shapes.
    """
    if not os.path.isdir(directory):
        raise MissingDataError(
            f"data.idx_dir={directory!r} is not a directory. For Fashion-MNIST run "
            "`apt-get install dataset-fashion-mnist`, or point data.idx_dir at a directory of "
            "MNIST-layout IDX files"
        )
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _idx_path(directory, stem)
        array = read_idx(path)
        arrays[key] = _as_images(array, path) if key.endswith("images") else array
        if key.endswith("labels") and array.ndim != 1:
            raise DataError(f"{path!r} has shape {array.shape}; a label file is one-dimensional")
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"data.idx_dir={directory!r}: {split} split has {n_img} images but {n_lab} labels"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"data.idx_dir={directory!r}: train images {arrays['train_images'].shape[1:]} and "
            f"test images {arrays['test_images'].shape[1:]} differ in shape"
        )
    return arrays


def _directory_fingerprint(directory: str) -> str:
    digest = hashlib.sha1(os.path.abspath(directory).encode())
    for stem in IDX_FILES.values():
        stat = os.stat(_idx_path(directory, stem))
        digest.update(f"{stem}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _idx_builder_class():
    # TFDS is imported lazily: it is slow to import and only needed when data is prepared.
    import tensorflow_datasets as tfds

    global _IDX_BUILDER
    if _IDX_BUILDER is not None:
        return _IDX_BUILDER

    @dataclasses.dataclass
    class IdxConfig(tfds.core.BuilderConfig):
        image_shape: tuple = (28, 28, 1)
        num_classes: int = 10

    class IdxImages(tfds.core.GeneratorBasedBuilder):
        """MNIST-layout IDX files from a local directory (the manual dir)."""

        VERSION = tfds.core.Version("1.1.0")  # 1.1.0: records keep the files' order
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the directory of the four IDX files as manual_dir."
        BUILDER_CONFIGS = []

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(
                            shape=tuple(self.builder_config.image_shape), dtype=np.uint8
                        ),
                        "label": tfds.features.ClassLabel(
                            num_classes=self.builder_config.num_classes
                        ),
                    }
                ),
                supervised_keys=("image", "label"),
                # Keep the files' order: sample i of the split is record i of the file.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            arrays = read_idx_directory(os.fspath(dl_manager.manual_dir))
            return {
                split: self._generate_examples(arrays[f"{split}_images"], arrays[f"{split}_labels"])
                for split in ("train", "test")
            }

        def _generate_examples(self, images, labels):
            for i in range(len(images)):
                yield i, {"image": images[i], "label": int(labels[i])}

    _IDX_BUILDER = (IdxImages, IdxConfig)
    return _IDX_BUILDER


_IDX_BUILDER = None


def _read_builder(builder, name: str) -> Dataset:
    sources = builder.as_data_source()
    missing = {"train", "test"} - set(sources)
    if missing:
        raise DataError(
            f"dataset {name!r} has no {sorted(missing)} split; it has {sorted(sources)}"
        )
    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    num_classes = features[label_key].num_classes
    arrays = {}
    for split in ("train", "test"):
        source = sources[split]
        records = source.__getitems__(range(len(source)))
        images = np.stack([np.asarray(r[image_key]) for r in records]).astype(np.uint8)
        arrays[split] = (
            images if images.ndim == 4 else images[..., None],
            np.asarray([r[label_key] for r in records], np.int32),
        )
    return Dataset(
        train_images=arrays["train"][0],
        train_labels=arrays["train"][1],
        test_images=arrays["test"][0],
        test_labels=arrays["test"][1],
        num_classes=int(num_classes),
        name=name,
    )


@contextlib.contextmanager
def _quiet_absl():
    # TFDS warns "Using custom data configuration" for every dynamic config; it is expected here.
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_idx_directory(directory: str, data_dir: str) -> Dataset:
    """Loads a directory of MNIST-layout IDX files through the ``IdxImages`` TFDS builder.

    Args:
      directory: the directory of the four IDX files.
      data_dir: where TFDS keeps the prepared array_record files.
    """
    import tensorflow_datasets as tfds

    arrays = read_idx_directory(directory)
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]])
    builder_cls, config_cls = _idx_builder_class()
    config = config_cls(
        name=f"d{_directory_fingerprint(directory)}",
        image_shape=tuple(arrays["train_images"].shape[1:]),
        num_classes=int(labels.max()) + 1,
    )
    with _quiet_absl():
        builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=directory))
    return _read_builder(builder, f"idx:{os.path.abspath(directory)}")


def load_tfds(name: str, data_dir: str | None, download: bool) -> Dataset:
    """Loads a TFDS dataset by name (array_record data source).

    Raises:
      ValueError: the dataset is not prepared in ``data_dir`` and ``download`` is off.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        if not download:
            raise DataError(
                f"data.name={name!r} is not prepared in data.data_dir={data_dir!r}; set "
                "data.download=True (needs internet) or prepare it there first"
            )
        builder.download_and_prepare()
    return _read_builder(builder, f"tfds:{name}")


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def first_test_samples(dataset: Dataset, count: int) -> Dataset:
    """``dataset`` with only its first ``count`` test samples (0: all of them)."""
    if not count or count >= len(dataset.test_labels):
        return dataset
    return dataclasses.replace(
        dataset, test_images=dataset.test_images[:count], test_labels=dataset.test_labels[:count]
    )


def load_dataset(data_cfg) -> Dataset:
    """Loads the dataset a ``config.data`` block names (``source`` is "idx" or "tfds")."""
    data_dir = data_cfg.data_dir or default_data_dir()
    if data_cfg.source == "idx":
        return load_idx_directory(data_cfg.idx_dir, data_dir)
    if data_cfg.source == "tfds":
        return load_tfds(data_cfg.name, data_dir, data_cfg.download)
    raise ConfigError(f"data.source={data_cfg.source!r} is unknown; allowed: 'idx', 'tfds'")
