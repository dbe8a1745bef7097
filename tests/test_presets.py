"""Random initialisations of the architecture presets: the benchmark init and the training init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.unet import UNet
from sdjax.weights.presets import random_pretrained
from tests.helpers import flat_params


@pytest.fixture(scope="module")
def training_init():
    return random_pretrained("tiny", seed=0, for_training=True)


def test_training_init_zeroes_the_unet_residual_branch_outputs(training_init):
    leaves = flat_params(training_init.params["unet"])
    zero = sorted(k for k, v in leaves.items() if v.ndim > 1 and not v.any())
    conv2 = [k for k in leaves if "['conv2']['kernel']" in k]
    proj_out = [k for k in leaves if "['proj_out']['kernel']" in k]
    assert conv2 and proj_out
    assert zero == sorted(conv2 + proj_out + ["['conv_out']['kernel']"])


def test_training_init_unet_starts_at_zero_output(training_init):
    cfg = training_init.unet_config
    size = cfg.sample_size
    x = jax.random.normal(jax.random.key(0), (2, size, size, cfg.in_channels))
    ctx = jax.random.normal(jax.random.key(1), (2, 77, cfg.cross_attention_dim))
    out = UNet(cfg).apply({"params": training_init.params["unet"]}, x, jnp.array([10, 900]), ctx)
    assert out.shape == x.shape
    assert float(jnp.abs(out).max()) == 0.0


def test_training_init_kernels_are_fan_in_scaled(training_init):
    for part in ("unet", "vae"):
        kernels = {key: value for key, value in flat_params(training_init.params[part]).items()
                   if key.endswith("['kernel']") and value.any() and value.size >= 2000}
        assert kernels, part
        for key, value in kernels.items():
            fan_in = int(np.prod(value.shape[:-1]))
            assert value.std() == pytest.approx(1 / np.sqrt(fan_in), rel=0.1), (part, key)


def test_default_init_is_the_small_normal_everywhere(tiny_model):
    leaves = flat_params(tiny_model.params["unet"])
    kernels = [v for k, v in leaves.items() if k.endswith("['kernel']") and v.size >= 2000]
    assert kernels and all(v.std() == pytest.approx(0.02, rel=0.1) for v in kernels)
    scales = [v for k, v in leaves.items() if k.endswith("['scale']")]
    assert scales and all((v == 1).all() for v in scales)
