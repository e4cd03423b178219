import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sflam_jax import quant


def _activations(seed=0, shape=(3, 5, 4)):
    return (
        jax.random.normal(jax.random.key(seed), shape) * jnp.arange(1, shape[0] + 1)[:, None, None]
    )


def test_identity_at_32_bits():
    a = _activations()
    np.testing.assert_array_equal(quant.stochastic_quantize(a, 32, jax.random.key(1)), a)
    np.testing.assert_array_equal(quant.quantize(a, 32, jax.random.key(1)), a)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_values_on_grid_and_inside_range(bits):
    a = _activations()
    q = np.asarray(quant.stochastic_quantize(a, bits, jax.random.key(3)))
    a = np.asarray(a)
    for i in range(a.shape[0]):
        lo, hi = a[i].min(), a[i].max()
        step = (hi - lo) / (2**bits - 1)
        assert q[i].min() >= lo and q[i].max() <= hi
        levels = (q[i] - lo) / step
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        # Stochastic rounding moves a value to one of its two neighbouring levels only.
        assert np.all(np.abs(q[i] - a[i]) <= step * (1 + 1e-5))


@pytest.mark.parametrize("bits", [2, 4])
def test_unbiased_and_variance_bound(bits):
    a = _activations(shape=(2, 6, 3))
    keys = jax.random.split(jax.random.key(0), 20000)
    q = jax.vmap(lambda k: quant.stochastic_quantize(a, bits, k))(keys)
    mean = np.asarray(q.mean(0))
    var = np.asarray(q.var(0))
    a = np.asarray(a)
    for i in range(a.shape[0]):
        step = (a[i].max() - a[i].min()) / (2**bits - 1)
        # Standard error of the mean is at most (step / 2) / sqrt(20000); allow 5 of them.
        np.testing.assert_allclose(mean[i], a[i], atol=5 * step / 2 / np.sqrt(len(keys)))
        assert np.all(var[i] <= step**2 / 4 * 1.05)
        # The exact Bernoulli variance: frac * (1 - frac) * step^2.
        frac = (a[i] - a[i].min()) / step % 1.0
        np.testing.assert_allclose(var[i], frac * (1 - frac) * step**2, atol=0.03 * step**2)


def test_same_key_same_result_other_key_differs():
    a = _activations()
    q1 = quant.stochastic_quantize(a, 3, jax.random.key(7))
    q2 = quant.stochastic_quantize(a, 3, jax.random.key(7))
    q3 = quant.stochastic_quantize(a, 3, jax.random.key(8))
    np.testing.assert_array_equal(q1, q2)
    assert not np.array_equal(q1, q3)


def test_constant_sample_is_kept():
    a = jnp.full((2, 3, 4), 1.5)
    np.testing.assert_array_equal(quant.stochastic_quantize(a, 4, jax.random.key(0)), a)


def test_gradient_is_straight_through():
    a = _activations()
    w = jax.random.normal(jax.random.key(5), a.shape)
    grad = jax.grad(lambda x: jnp.sum(w * quant.quantize(x, 2, jax.random.key(1)) ** 2))(a)
    q = quant.quantize(a, 2, jax.random.key(1))
    np.testing.assert_allclose(grad, 2 * w * q, rtol=1e-6)


def test_cut_channel_quantizes_the_returned_gradient():
    a = _activations()
    key = jax.random.key(11)
    w = jax.random.normal(jax.random.key(5), a.shape)
    up_key, down_key = jax.random.split(key)
    for down_bits in (32, 3):
        grad = jax.grad(lambda x: jnp.sum(w * quant.cut_layer_channel(x, 8, down_bits, key)))(a)
        np.testing.assert_array_equal(grad, quant.stochastic_quantize(w, down_bits, down_key))
    forward = quant.cut_layer_channel(a, 4, 32, key)
    np.testing.assert_array_equal(forward, quant.stochastic_quantize(a, 4, up_key))


def test_bits_per_client_under_vmap():
    a = jnp.stack([_activations(seed=s) for s in range(3)])  # [clients, B, T, D]
    bits = jnp.array([2.0, 8.0, 32.0])
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.jit(jax.vmap(quant.quantize))(a, bits, keys)
    for k in range(3):
        np.testing.assert_allclose(q[k], quant.quantize(a[k], int(bits[k]), keys[k]), atol=1e-6)
    np.testing.assert_array_equal(q[2], a[2])
    assert len(np.unique(np.asarray(q[0][0]))) <= 4


def test_payload_bits_and_error_proxy():
    np.testing.assert_allclose(quant.payload_bits(8, 100), 864)
    np.testing.assert_allclose(quant.payload_bits(32, 100), 3200)
    np.testing.assert_allclose(quant.payload_bits(jnp.array([4, 32]), 10), [104, 320])
    np.testing.assert_allclose(quant.error_proxy(2, 10, 3.0), 10 * 9 / (4 * 9))
    np.testing.assert_allclose(quant.error_proxy(32, 10, 3.0), 0.0)
