import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sflam_jax import quant
from sflam_jax.models import split as split_lib
from sflam_jax.models import vit


@pytest.fixture(scope="module")
def setup():
    cfg = vit.vit_config("tiny", image_size=14, channels=3, num_classes=5, patch_size=7)
    cfg = vit.ViTConfig(**{**cfg.__dict__, "depth": 3})
    params = vit.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 14, 14, 3))
    return cfg, params, x


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_split_equals_unsplit_model_exactly(setup, cut):
    cfg, params, x = setup
    full = vit.ViT(cfg).apply({"params": params}, x)
    model = split_lib.split(cfg, cut)
    params_c, params_s = split_lib.split_params(params, cut, cfg.depth)
    assert sorted(params_c) == sorted(["embedding", *[f"block_{i}" for i in range(cut)]])
    smashed = model.client_apply(params_c, x)
    assert smashed.shape == (4, *model.smashed_shape) == (4, 5, 32)
    np.testing.assert_array_equal(model.server_apply(params_s, smashed), full)
    assert split_lib.merge_params(params_c, params_s).keys() == params.keys()


def test_cut_layer_out_of_range(setup):
    cfg, _, _ = setup
    with pytest.raises(ValueError, match="model.cut_layer=4"):
        split_lib.split(cfg, 4)
    with pytest.raises(ValueError, match="model.cut_layer=-1"):
        split_lib.split(cfg, -1)


def test_patch_embedding_matches_a_strided_convolution(setup):
    cfg, params, x = setup
    emb = params["embedding"]
    tokens = vit.Embedding(cfg).apply({"params": emb}, x)
    kernel = emb["patch"]["kernel"].reshape(7, 7, 3, cfg.hidden_size)  # HWIO
    conv = jax.lax.conv_general_dilated(
        x, kernel, (7, 7), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    conv = conv.reshape(4, -1, cfg.hidden_size) + emb["patch"]["bias"]
    np.testing.assert_allclose(tokens[:, 1:], conv + emb["position"][:, 1:], atol=1e-5)
    np.testing.assert_allclose(tokens[:, 0], jnp.broadcast_to(emb["position"][0, 0], (4, 32)))


def test_attention_matches_a_plain_einsum_reference(setup):
    cfg, params, x = setup
    p = params["block_0"]["attention"]
    h = jax.random.normal(jax.random.key(2), (2, 5, cfg.hidden_size))
    out = vit.Attention(cfg).apply({"params": p}, h)
    heads, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads

    def proj(name):
        return (h @ p[name]["kernel"] + p[name]["bias"]).reshape(2, 5, heads, hd)

    q, k, v = proj("query"), proj("key"), proj("value")
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), axis=-1)
    ref = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 5, -1) @ p["out"]["kernel"]
    np.testing.assert_allclose(out, ref + p["out"]["bias"], atol=1e-5)


def test_presets_cover_tiny_to_vit_b():
    b16 = vit.vit_config("b16", image_size=224, channels=3, num_classes=10)
    b32 = vit.vit_config("b32", image_size=224, channels=3, num_classes=10)
    assert (b16.hidden_size, b16.depth, b16.num_heads, b16.mlp_dim) == (768, 12, 12, 3072)
    assert b16.num_tokens == 197 and b32.num_tokens == 50
    shapes = jax.eval_shape(lambda k: vit.init_params(b32, k), jax.random.key(0))
    assert split_lib.num_params(shapes) == 87_462_922  # ViT-B/32 with a 10-class head
    with pytest.raises(ValueError, match="model.preset='huge'"):
        vit.vit_config("huge", image_size=224, channels=3, num_classes=10)
    with pytest.raises(ValueError, match="model.patch_size=16"):
        vit.vit_config("b16", image_size=100, channels=3, num_classes=10)


@pytest.mark.parametrize("fwd_bwd", [(8, None), (8, 8)])
def test_aqt_segments_train_under_jit_grad_and_vmap(setup, fwd_bwd):
    cfg, params, x = setup
    dg = quant.aqt_dot_general_cls(*fwd_bwd)
    model = split_lib.split(cfg, 1, dg, dg)
    float_model = split_lib.split(cfg, 1)
    params_c, params_s = split_lib.split_params(params, 1, cfg.depth)
    labels = jnp.arange(4) % 5

    def loss(pc, ps, images, key):
        k1, k2 = jax.random.split(key)
        logits = model.server_apply(ps, model.client_apply(pc, images, k1), k2)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0, 0)))(
        params_c, params_s, jnp.stack([x, -x]), jax.random.split(jax.random.key(0), 2)
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # int8 matmuls stay close to float but are not float.
    key = jax.random.key(3)
    q_out = model.server_apply(params_s, model.client_apply(params_c, x, key), key)
    f_out = float_model.server_apply(params_s, float_model.client_apply(params_c, x))
    assert not np.array_equal(q_out, f_out)
    np.testing.assert_allclose(q_out, f_out, atol=0.1)


def test_float_injection_is_none():
    assert quant.aqt_dot_general_cls(None, None) is None


def test_segment_flops_follow_the_cut():
    # Wide enough that matmuls dominate (norms, softmax and GELU add about 3% here).
    cfg = vit.ViTConfig(
        image_size=28,
        channels=1,
        num_classes=10,
        patch_size=7,
        hidden_size=256,
        depth=4,
        num_heads=4,
        mlp_dim=1024,
    )
    params = vit.init_params(cfg, jax.random.key(0))
    t, d, m = cfg.num_tokens, cfg.hidden_size, cfg.mlp_dim
    # Hand count of the matmuls (2 FLOPs per multiply-add) of one block and the embedding.
    block = 2 * t * (4 * d * d + 2 * d * m) + 2 * 2 * t * t * d
    embed = 2 * cfg.num_patches * 49 * d
    totals = []
    for cut in (0, 2):
        model = split_lib.split(cfg, cut)
        pc, ps = split_lib.split_params(params, cut, cfg.depth)
        f_c, f_s = split_lib.segment_flops(model, pc, ps, (28, 28, 1))
        np.testing.assert_allclose(f_c, embed + cut * block, rtol=0.1)
        np.testing.assert_allclose(f_s, (cfg.depth - cut) * block, rtol=0.1)
        totals.append(f_c + f_s)
    np.testing.assert_allclose(totals[0], totals[1], rtol=1e-3)
