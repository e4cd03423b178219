"""Hugging Face ViT checkpoints -> the sflam_jax ViT parameter tree.

A checkpoint is a hub name (``google/vit-base-patch32-224-in21k``) or a local directory holding
``config.json`` and the weights: ``model.safetensors`` (preferred), ``flax_model.msgpack`` or
``pytorch_model.bin`` (needs torch). ``ViTModel`` and ``ViTForImageClassification`` files both
load (the latter's names carry a ``vit.`` prefix). The pooler is not part of the sflam_jax ViT and
is skipped; any other tensor the mapping does not know, a missing one or one of the wrong shape
raises ``PretrainedError`` naming it.

Weights of ``torch.nn.Linear`` are ``[out, in]`` and become ``[in, out]`` kernels; the patch
convolution ``[D, C, P, P]`` becomes the dense kernel on patches flattened as ``(row, col,
channel)``, which is what ``vit.Embedding`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax.errors import SflamError
from sflam_jax.models import vit

WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")
# The checkpoint's tensors that sflam_jax's ViT has no place for (ViTModel's pooler).
IGNORED = ("pooler.dense.weight", "pooler.dense.bias")


class PretrainedError(SflamError, ValueError):
    """A checkpoint that cannot be mapped onto the ViT; the message names the tensor or field."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded checkpoint.

    Attributes:
      config: the checkpoint's architecture (its own image size and classes).
      params: the full ViT parameter tree for ``config`` (``head.classifier`` only when the
        checkpoint has a classifier).
      image_mean, image_std: per-channel normalisation the checkpoint was trained with ([0, 1]
        scale).
      source: the directory the files came from.
    """

    config: vit.ViTConfig
    params: dict
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    source: str


def resolve(name_or_dir: str) -> str:
    """A local directory as is; otherwise the hub snapshot of ``name_or_dir`` (downloads once)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") != 1:
        raise PretrainedError(
            f"model.pretrained={name_or_dir!r} is not a directory (nor an 'owner/name' hub id)"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_dir, allow_patterns=["config.json", "preprocessor_config.json", *WEIGHT_FILES]
        )
    except Exception as e:  # noqa: BLE001 (hub errors have many types; the message says which)
        raise PretrainedError(
            f"model.pretrained={name_or_dir!r} is neither a local directory nor a reachable hub "
            f"checkpoint ({type(e).__name__}: {e})"
        ) from e


def architecture(directory: str) -> tuple[vit.ViTConfig, dict]:
    """``(ViTConfig, id2label)`` from the checkpoint's ``config.json`` (transformers.ViTConfig)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(directory)
    if hf.model_type != "vit":
        raise PretrainedError(
            f"{directory}: model_type={hf.model_type!r}; only 'vit' checkpoints are supported"
        )
    if hf.hidden_act != "gelu":
        raise PretrainedError(f"{directory}: hidden_act={hf.hidden_act!r}; the ViT uses 'gelu'")
    if not getattr(hf, "qkv_bias", True):
        raise PretrainedError(f"{directory}: qkv_bias=False is not supported")
    id2label = dict(getattr(hf, "id2label", {}) or {})
    cfg = vit.ViTConfig(
        image_size=int(hf.image_size),
        channels=int(hf.num_channels),
        num_classes=len(id2label) or 1,
        patch_size=int(hf.patch_size),
        hidden_size=int(hf.hidden_size),
        depth=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads),
        mlp_dim=int(hf.intermediate_size),
        layer_norm_eps=float(hf.layer_norm_eps),
    )
    return cfg, id2label


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint by its Hugging Face name, as float32 numpy arrays."""
    path = next(
        (
            os.path.join(directory, f)
            for f in WEIGHT_FILES
            if os.path.exists(os.path.join(directory, f))
        ),
        None,
    )
    if path is None:
        raise PretrainedError(
            f"{directory} holds none of the weight files {', '.join(WEIGHT_FILES)}"
        )
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
    elif path.endswith(".msgpack"):
        from flax import serialization, traverse_util

        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        flat = traverse_util.flatten_dict(tree, sep=".")
        tensors = {_flax_name(k.removeprefix("params.")): v for k, v in flat.items()}
    else:
        try:
            import torch
        except ImportError as e:
            raise PretrainedError(f"{path} is a PyTorch file: reading it needs torch") from e
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = {k: v.float().numpy() for k, v in state.items()}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _flax_name(name: str) -> str:
    """A Flax (transformers < 5) parameter name -> the PyTorch name (kernels stay ``[in, out]``)."""
    return name.replace(".kernel", ".weight").replace(".scale", ".weight")


def _block_map(i: int) -> dict:
    """``(our path) -> (HF name, kind)`` for block i; kind says how to convert the tensor."""
    hf = f"encoder.layer.{i}."
    ours = f"block_{i}/"
    table = {
        "attention/query": "attention.attention.query",
        "attention/key": "attention.attention.key",
        "attention/value": "attention.attention.value",
        "attention/out": "attention.output.dense",
        "mlp_in": "intermediate.dense",
        "mlp_out": "output.dense",
    }
    out = {}
    for layer, name in table.items():
        out[f"{ours}{layer}/kernel"] = (f"{hf}{name}.weight", "linear")
        out[f"{ours}{layer}/bias"] = (f"{hf}{name}.bias", "copy")
    for norm, name in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
        out[f"{ours}{norm}/scale"] = (f"{hf}{name}.weight", "copy")
        out[f"{ours}{norm}/bias"] = (f"{hf}{name}.bias", "copy")
    return out


def name_map(cfg: vit.ViTConfig, classifier: bool) -> dict[str, tuple[str, str]]:
    """``"block_0/attention/query/kernel" -> ("encoder.layer.0.attention.attention.query.weight",
    "linear")`` for every parameter of the ViT (the classifier only when ``classifier``)."""
    out = {
        "embedding/patch/kernel": ("embeddings.patch_embeddings.projection.weight", "conv"),
        "embedding/patch/bias": ("embeddings.patch_embeddings.projection.bias", "copy"),
        "embedding/cls": ("embeddings.cls_token", "copy"),
        "embedding/position": ("embeddings.position_embeddings", "copy"),
        "head/norm/scale": ("layernorm.weight", "copy"),
        "head/norm/bias": ("layernorm.bias", "copy"),
    }
    for i in range(cfg.depth):
        out.update(_block_map(i))
    if classifier:
        out["head/classifier/kernel"] = ("classifier.weight", "linear")
        out["head/classifier/bias"] = ("classifier.bias", "copy")
    return out


def _convert(value: np.ndarray, kind: str, flax_file: bool) -> np.ndarray:
    if kind == "linear":
        return value if flax_file else value.T
    if kind == "conv":
        if flax_file:  # Flax conv kernels are [P, P, C, D] already
            return value.reshape(-1, value.shape[-1])
        d = value.shape[0]
        return value.transpose(2, 3, 1, 0).reshape(-1, d)
    return value


def to_params(tensors: dict[str, np.ndarray], cfg: vit.ViTConfig, flax_file: bool = False) -> dict:
    """Maps checkpoint tensors onto the ViT tree of ``cfg`` (shapes checked against ``cfg``)."""
    tensors = {k.removeprefix("vit."): v for k, v in tensors.items()}
    classifier = "classifier.weight" in tensors
    mapping = name_map(cfg, classifier)
    known = {hf for hf, _ in mapping.values()} | set(IGNORED)
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise PretrainedError(
            f"checkpoint tensor {unknown[0]!r} has no place in the ViT"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    expected = jax.eval_shape(lambda k: vit.init_params(cfg, k), jax.random.key(0))
    flat = {}
    for path, (hf, kind) in mapping.items():
        if hf not in tensors:
            raise PretrainedError(f"checkpoint tensor {hf!r} is missing")
        value = _convert(tensors[hf], kind, flax_file)
        want = _at(expected, path).shape
        if value.shape != want:
            raise PretrainedError(
                f"checkpoint tensor {hf!r} has shape {tensors[hf].shape}; the config.json "
                f"architecture needs {want} for {path}"
            )
        flat[path] = jnp.asarray(value)
    params: dict = {}
    for path, value in flat.items():
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return params


def _at(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _preprocessing(directory: str, channels: int) -> tuple[tuple, tuple]:
    """Normalisation from ``preprocessor_config.json``; ViT's 0.5 / 0.5 when there is none."""
    mean, std = [0.5] * channels, [0.5] * channels
    path = os.path.join(directory, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            pre = json.load(f)
        if pre.get("do_normalize", True):
            mean = pre.get("image_mean", mean)
            std = pre.get("image_std", std)
        else:
            mean, std = [0.0] * channels, [1.0] * channels
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load(name_or_dir: str) -> Pretrained:
    """Reads a checkpoint into the sflam_jax ViT tree at its own image size and classes."""
    directory = resolve(name_or_dir)
    cfg, _ = architecture(directory)
    tensors = {k.removeprefix("vit."): v for k, v in read_tensors(directory).items()}
    flax_file = not os.path.exists(os.path.join(directory, "model.safetensors")) and os.path.exists(
        os.path.join(directory, "flax_model.msgpack")
    )
    head = tensors.get("classifier.weight")
    if head is not None:  # [classes, D] in PyTorch files, [D, classes] in Flax ones
        cfg = dataclasses.replace(cfg, num_classes=int(head.shape[-1 if flax_file else 0]))
    params = to_params(tensors, cfg, flax_file)
    mean, std = _preprocessing(directory, cfg.channels)
    return Pretrained(cfg, params, mean, std, directory)


def interpolate_positions(position: jax.Array, old_grid: int, new_grid: int) -> jax.Array:
    """``[1, 1 + g0^2, D]`` -> ``[1, 1 + g1^2, D]``: bilinear resize of the patch positions' grid;
    the class token's position is kept."""
    if old_grid == new_grid:
        return position
    cls, grid = position[:, :1], position[:, 1:]
    d = grid.shape[-1]
    grid = grid.reshape(old_grid, old_grid, d)
    grid = jax.image.resize(grid, (new_grid, new_grid, d), "bilinear")
    return jnp.concatenate([cls, grid.reshape(1, new_grid * new_grid, d)], axis=1)


def adapt(pretrained: Pretrained, image_size: int, num_classes: int) -> tuple[vit.ViTConfig, dict]:
    """The checkpoint's ViT for this data: positions resized to ``image_size``, and a new
    zero-initialised classifier when the checkpoint has none or another number of classes.

    Raises:
      PretrainedError: ``image_size`` is not a multiple of the checkpoint's patch size.
    """
    cfg = pretrained.config
    if image_size % cfg.patch_size:
        raise PretrainedError(
            f"data.image_size={image_size} is not a multiple of the checkpoint's patch size "
            f"{cfg.patch_size}"
        )
    params = dict(pretrained.params)
    new_cfg = dataclasses.replace(cfg, image_size=image_size, num_classes=num_classes)
    params["embedding"] = dict(params["embedding"])
    params["embedding"]["position"] = interpolate_positions(
        params["embedding"]["position"],
        cfg.image_size // cfg.patch_size,
        image_size // cfg.patch_size,
    )
    head = dict(params["head"])
    classifier = head.get("classifier")
    if classifier is None or classifier["kernel"].shape[-1] != num_classes:
        # A new head starts at zero (all logits 0), the usual start for fine-tuning.
        head["classifier"] = {
            "kernel": jnp.zeros((cfg.hidden_size, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32),
        }
    params["head"] = head
    return new_cfg, params
