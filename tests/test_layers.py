"""The shared layers' contractions: 16-bit inputs on the CPU backend accumulate and come out in
float32, rounded to the input dtype once (what makes XLA's CPU bf16 dot run at full speed);
float32 is untouched, and the dense layer keeps nn.Dense's params."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import layers

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-backend behaviour")


def _inputs(dtype):
    return jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 96)), dtype)


def test_accumulation_dtype_is_float32_only_for_16_bit_inputs():
    assert layers.accumulation_dtype(jnp.bfloat16) == jnp.float32
    assert layers.accumulation_dtype(jnp.float16) == jnp.float32
    assert layers.accumulation_dtype(jnp.float32) is None


def test_bfloat16_dense_accumulates_in_float32_and_rounds_once():
    x = _inputs(jnp.bfloat16)
    dense = layers.Dense(64, dtype=jnp.bfloat16)
    params = dense.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, nn.Dense(64).init(jax.random.key(0), x))
    out = dense.apply(params, x)
    assert out.dtype == jnp.bfloat16
    kernel = params["params"]["kernel"].astype(jnp.bfloat16)
    bias = params["params"]["bias"].astype(jnp.bfloat16)
    accumulated = jax.lax.dot_general(x, kernel, (((2,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(accumulated.astype(jnp.bfloat16) + bias, np.float32))
    hlo = jax.jit(dense.apply).lower(params, x).as_text()
    assert re.search(r"dot_general.*bf16>\) -> tensor<[0-9x]+xf32>", hlo), hlo


def test_float32_dense_is_flax_dense():
    x = _inputs(jnp.float32)
    params = nn.Dense(64).init(jax.random.key(0), x)
    np.testing.assert_array_equal(layers.Dense(64).apply(params, x), nn.Dense(64).apply(params, x))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_einsum_keeps_the_input_dtype(dtype):
    a = _inputs(dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((96, 32)), dtype)
    out = layers.einsum("bld,de->ble", a, b)
    assert out.dtype == dtype
    expected = jnp.einsum("bld,de->ble", a, b, preferred_element_type=jnp.float32).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
