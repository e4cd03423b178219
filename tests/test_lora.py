"""LoRA adapters and the QLoRA base (SPEC section 8): a fresh adapter changes nothing, the adapter
form equals its merged kernel, the targets, the trainable split, and the block quantizers against
numpy ones written here."""

import dataclasses
import json
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_metrics
from oracles import engine_of, oracle_round, setup

from sflam_jax import quant, train
from sflam_jax.algorithms.base import Adapters, Preprocess, RoundState
from sflam_jax.models import lora, vit

CFG = vit.vit_config("tiny", image_size=14, channels=1, num_classes=3)
PRE = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)


def _model(targets="all", rank=4, alpha=8.0):
    params = vit.init_params(CFG, jax.random.key(0))
    paths = lora.target_paths(params, targets)
    return params, lora.add_adapters(params, paths, rank, alpha, jax.random.key(1)), paths


def _images():
    return jax.random.normal(jax.random.key(2), (3, 14, 14, 1))


def _with_random_b(params, key):
    adapters, base = lora.partition(params)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        jax.random.normal(k, v.shape) * 0.1 if v.shape[0] != CFG.hidden_size else v
        for k, v in zip(keys, leaves, strict=True)
    ]
    return lora.combine(base, jax.tree.unflatten(tree, leaves))


def test_targets():
    params = vit.init_params(CFG, jax.random.key(0))
    attention = lora.target_paths(params, "attention")
    assert sorted(attention) == sorted(
        f"block_{i}/attention/{n}"
        for i in range(CFG.depth)
        for n in ("query", "key", "value", "out")
    )
    assert sorted(lora.target_paths(params, "mlp")) == sorted(
        f"block_{i}/{n}" for i in range(CFG.depth) for n in ("mlp_in", "mlp_out")
    )
    assert lora.target_paths(params, r"block_1/attention/(query|value)$") == [
        "block_1/attention/query",
        "block_1/attention/value",
    ]
    # The patch embedding and the classifier are dense layers too, but no preset targets them.
    assert not any("patch" in p or "classifier" in p for p in lora.target_paths(params, "all"))


def test_fresh_adapter_changes_nothing():
    """B = 0: every output bit-identical to the model without adapters."""
    params, adapted, paths = _model()
    assert len(paths) == 6 * CFG.depth
    x = _images()
    plain = vit.ViT(CFG).apply({"params": params}, x)
    np.testing.assert_array_equal(vit.ViT(CFG).apply({"params": adapted}, x), plain)


def test_adapter_form_equals_merged_kernels():
    """``x W + s (x A) B`` against ``x (W + s A B)`` (1e-5), with B random."""
    _, adapted, _ = _model()
    trained = _with_random_b(adapted, jax.random.key(3))
    x = _images()
    got = vit.ViT(CFG).apply({"params": trained}, x)
    want = vit.ViT(CFG).apply({"params": lora.merge(trained)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The adapters matter: the merged model differs from the base.
    base = vit.ViT(CFG).apply({"params": lora.merge(adapted)}, x)
    assert float(jnp.max(jnp.abs(got - base))) > 1e-3


def test_adapters_on_aqt_matmuls():
    """With AQT's int8 ``dot_general`` the base goes through AQT; a fresh adapter changes
    nothing and a trained one adds ``s (x A) B`` in float."""
    dg = quant.aqt_dot_general_cls(8, 8)
    params, adapted, _ = _model("attention")
    x = _images()
    model = vit.ViT(CFG, dg)
    key = {"params": jax.random.key(4)}
    plain = model.apply({"params": params}, x, rngs=key)
    np.testing.assert_array_equal(model.apply({"params": adapted}, x, rngs=key), plain)
    trained = _with_random_b(adapted, jax.random.key(3))
    assert float(jnp.max(jnp.abs(model.apply({"params": trained}, x, rngs=key) - plain))) > 1e-3


@pytest.mark.parametrize("trains_a", [True, False])
def test_partition_and_combine(trains_a):
    _, adapted, paths = _model()
    adapters, base = lora.partition(adapted, trains_a)
    names = {p.rsplit("/", 1)[-1] for p in lora.flat_paths(adapters)}
    assert names == ({lora.LORA_A, lora.LORA_B} if trains_a else {lora.LORA_B})
    assert len(lora.flat_paths(adapters)) == len(paths) * (2 if trains_a else 1)
    merged = lora.combine(base, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(adapted)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(adapted), strict=True):
        np.testing.assert_array_equal(a, b)


# -- the quantized base, against numpy -------------------------------------------------------


def _np_blocks(w):
    flat = np.ravel(np.asarray(w, np.float64))
    blocks = np.pad(flat, (0, -flat.size % 64)).reshape(-1, 64)
    absmax = np.abs(blocks).max(1)
    return flat.size, blocks, np.where(absmax > 0, absmax, 1.0)


def np_int8_roundtrip(w):
    n, blocks, scale = _np_blocks(w)
    q = np.clip(np.rint(blocks / scale[:, None] * 127), -127, 127)
    return (q / 127 * scale[:, None]).ravel()[:n].reshape(np.shape(w)), scale


# The NF4 table as QLoRA's paper defines it: quantiles of N(0, 1) at evenly spaced
# probabilities, 8 on the positive side and 7 on the negative side, normalised to [-1, 1], plus 0.
def np_nf4_levels():
    from statistics import NormalDist

    offset = 0.5 * (1 / 32 + 1 / 30)
    pos = [NormalDist().inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]][::-1]
    neg = [NormalDist().inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    pos = [-v for v in pos]
    levels = np.asarray(sorted([*neg, 0.0, *pos]))
    return levels / np.abs(levels).max()


def np_nf4_roundtrip(w):
    n, blocks, scale = _np_blocks(w)
    levels = np.asarray(lora.NF4_LEVELS, np.float64)
    unit = blocks / scale[:, None]
    idx = np.abs(unit[..., None] - levels).argmin(-1)
    return (levels[idx] * scale[:, None]).ravel()[:n].reshape(np.shape(w)), scale


def test_nf4_table_is_qloras():
    np.testing.assert_allclose(lora.NF4_LEVELS, np_nf4_levels(), atol=2e-7)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(64, 192), (37, 5)])  # the second one pads its last block
def test_block_quantizers_against_numpy(bits, shape):
    w = np.asarray(jax.random.normal(jax.random.key(5), shape)) * 0.05
    w[0, :3] = 0.0  # exact zeros stay zeros
    q = lora.quantize_kernel(jnp.asarray(w), bits)
    got = np.asarray(lora.dequantize_kernel(q), np.float64)
    want, scale = (np_int8_roundtrip if bits == 8 else np_nf4_roundtrip)(w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert np.all(got[0, :3] == 0.0)
    # The format's bound: half a step of the grid in units of the block's absmax.
    steps = {8: 1 / 127, 4: float(np.max(np.diff(np_nf4_levels())))}
    half_step = steps[bits] / 2
    per_value = np.repeat(scale, 64)[: w.size].reshape(shape)
    assert np.all(np.abs(got - w) <= half_step * per_value * (1 + 1e-6))
    # Storage: a byte per value (int8) or per two (NF4), and a float32 scale per 64 values.
    blocks = -(-w.size // 64)
    assert q.nbytes == blocks * (64 * bits // 8 + 4)


def test_quantize_base_keeps_only_kernels_quantized_and_dequantizes_in_the_model():
    params, adapted, _ = _model()
    stored = lora.quantize_base(adapted, 8)
    kinds = {p: type(v).__name__ for p, v in lora.flat_paths(stored, with_values=True).items()}
    assert all(k == "QuantizedKernel" for p, k in kinds.items() if p.endswith("/kernel"))
    assert all(k != "QuantizedKernel" for p, k in kinds.items() if not p.endswith("/kernel"))
    x = _images()
    got = jax.jit(lambda s: vit.ViT(CFG).apply({"params": lora.dequantize(s)}, x))(stored)
    want = vit.ViT(CFG).apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))


def test_input_gradient_through_a_quantized_block():
    """Weight-only quantization: the gradient that would cross the cut (``J^T g`` at a block's
    input, for a fixed upstream gradient ``g``) against the float base's. int8 stays within 2%.
    NF4's 16 levels move it more (a tiny random-init block about 10%; DINOv2 ViT-S/14's blocks
    1 and 6 about 1.3%, block 11 15%: docs/lora.md), and int8's grid is about 17 times finer, so
    its error must be well below NF4's."""
    params = vit.init_params(CFG, jax.random.key(0))
    block = params["block_1"]
    x = jax.random.normal(jax.random.key(6), (4, CFG.num_tokens, CFG.hidden_size))
    g = jax.random.normal(jax.random.key(7), x.shape)

    def grad_at_input(p):
        return jax.vjp(lambda h: vit.Block(CFG).apply({"params": p}, h), x)[1](g)[0]

    exact = grad_at_input(block)

    def error(bits):
        got = grad_at_input(lora.dequantize(lora.quantize_base(block, bits)))
        return float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))

    int8, nf4 = error(8), error(4)
    assert int8 < 0.02, int8
    assert 0 < 4 * int8 < nf4 < 0.25, (int8, nf4)


# -- adapters in the split round, against the explicit-vjp oracle --------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _OnlyAdapters:
    """A split model whose segments are the trained parts alone: the frozen bases are added
    inside (so ``oracles.oracle_round`` differentiates and averages only what trains)."""

    model: Any
    frozen_c: dict
    frozen_s: dict

    def client_apply(self, train_c, x, key=None):
        return self.model.client_apply(lora.combine(self.frozen_c, train_c), x, key)

    def server_apply(self, train_s, a, key=None):
        return self.model.server_apply(lora.combine(self.frozen_s, train_s), a, key)


def _lora_setup(sizes, cut, trains_a=True, base_bits=0, modes=("adapters", "adapters")):
    model, state, data, images, labels, parts = setup(sizes, cut)
    adapters = Adapters(*modes, trains_a)
    segments = []
    for i, (segment, mode) in enumerate(zip((state.params_c, state.params_s), modes, strict=True)):
        if mode == "adapters":
            paths = lora.target_paths(segment, "all")
            segment = lora.add_adapters(segment, paths, 2, 4.0, jax.random.key(10 + i))
        if mode != "whole":
            train, base = adapters.split(segment, mode)
            segment = lora.combine(train, lora.quantize_base(base, base_bits))
        segments.append(segment)
    return model, RoundState.create(*segments), data, images, labels, parts, adapters


@pytest.mark.parametrize(
    ("cut", "trains_a", "base_bits", "modes"),
    [
        (1, True, 0, ("adapters", "adapters")),
        (1, False, 0, ("adapters", "adapters")),  # FFA-LoRA: A stays, B averages exactly
        (1, True, 4, ("adapters", "adapters")),  # QLoRA: NF4 base, bit-identical after the round
        (1, True, 0, ("whole", "adapters")),  # adapters on the server only, the device trains
        (1, True, 8, ("frozen", "adapters")),  # ... or is frozen (int8)
        (0, True, 4, ("frozen", "adapters")),  # a frozen embedding alone on the device
    ],
)
def test_round_matches_the_explicit_vjp_oracle(cut, trains_a, base_bits, modes):
    """One SFLAM round (float crossings, 3 clients of unequal sizes, lanes) against
    ``oracles.oracle_round`` run on the trained parts alone (explicit vjps at the cut, momentum
    SGD by hand, FedAvg in float64 of A and B separately, by samples, and of the head): 1e-5.
    The frozen base comes back bit-identical; under FFA that includes A, so the average of the
    clients' products ``A B_k`` is exactly ``A`` times the averaged B."""
    sizes = [7, 13, 3, 10, 5]
    model, state, data, images, labels, parts, adapters = _lora_setup(
        sizes, cut, trains_a, base_bits, modes
    )
    alg = engine_of(model, PRE, adapters=adapters)
    train = alg.algorithm.trainable(state.params_c, state.params_s)
    frozen = alg.algorithm.frozen_parts(state.params_c, state.params_s)
    only = _OnlyAdapters(model, *frozen)
    key = jax.random.key(42)
    clients, want_c, want_s, want_loss = oracle_round(
        only, RoundState.create(*train), images, labels, parts, key, 3, [32] * 3, 32, PRE
    )
    new, metrics = jax.jit(alg.round)(state, data, key, 32)
    np.testing.assert_array_equal(metrics["clients"], clients)
    got = alg.algorithm.trainable(new.params_c, new.params_s)
    chex.assert_trees_all_close(got, (want_c, want_s), atol=1e-5)
    np.testing.assert_allclose(metrics["train_loss"], want_loss, rtol=1e-5)
    chex.assert_trees_all_equal(alg.algorithm.frozen_parts(new.params_c, new.params_s), frozen)
    # The adapters learned (B left zero).
    b = [v for p, v in lora.flat_paths(got[1], True).items() if p.endswith(lora.LORA_B)]
    assert max(float(jnp.max(jnp.abs(v))) for v in b) > 1e-4


@pytest.mark.parametrize("algorithm", ["sflam", "sfl"])
def test_trainer_runs_qlora_reports_its_sizes_and_resumes(tiny_config, tmp_path, algorithm):
    """QLoRA (NF4 base, rank 4 on the attention projections of both segments) through the
    trainer: system.json's aggregated client parameters are the adapters' (by hand:
    ``cut * 4 projections * r (D + D)``), the device's training memory is below full
    fine-tuning's, and a run stopped after round 1 and resumed ends where the uninterrupted one
    does (the quantized base goes through the checkpoint)."""
    cfg = tiny_config
    cfg.algorithm, cfg.num_rounds, cfg.eval_every = algorithm, 2, 1
    cfg.lora.rank, cfg.lora.base_bits = 4, 4
    train.train_and_evaluate(cfg, str(tmp_path / "whole"))
    short = cfg.copy_and_resolve_references()
    short.num_rounds = 1
    train.train_and_evaluate(short, str(tmp_path / "resumed"))
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "whole")
    with open(tmp_path / "whole" / "system.json") as f:
        system = json.load(f)
    hidden = vit.PRESETS["tiny"][0]
    assert system["client_shared"] == cfg.model.cut_layer * 4 * 4 * 2 * hidden
    assert system["lora_device_trained_params"] == system["client_shared"]
    assert system["lora_device_memory_mib"] < system["sflam_device_memory_mib"]
