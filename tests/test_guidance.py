"""Classifier-free guidance against the reference formulas (diffusers' pipelines)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from sdjax.diffusion.guidance import classifier_free_guidance, guidance_combine

RNG = np.random.RandomState(0)
UNCOND = RNG.randn(3, 8, 8, 4).astype(np.float32)
COND = RNG.randn(3, 8, 8, 4).astype(np.float32) * 1.7 + 0.2


@pytest.mark.parametrize("scale,rescale", [(1.0, 0.0), (7.5, 0.0), (7.5, 0.7), (3.0, 1.0)])
def test_combine_matches_the_diffusers_formulas(scale, rescale):
    reference = torch.from_numpy(UNCOND) + scale * (torch.from_numpy(COND) - torch.from_numpy(UNCOND))
    if rescale > 0:
        reference = rescale_noise_cfg(reference, torch.from_numpy(COND), guidance_rescale=rescale)
    ours = guidance_combine(jnp.asarray(UNCOND), jnp.asarray(COND), jnp.float32(scale), rescale)
    np.testing.assert_allclose(np.asarray(ours), reference.numpy(), rtol=1e-5, atol=1e-5)


def test_per_image_scale_equals_separate_calls():
    scales = jnp.array([1.0, 4.0, 9.0])
    together = guidance_combine(jnp.asarray(UNCOND), jnp.asarray(COND), scales, jnp.array([0., .5, 1.]))
    for i, (s, r) in enumerate([(1.0, 0.0), (4.0, 0.5), (9.0, 1.0)]):
        alone = guidance_combine(jnp.asarray(UNCOND[i:i + 1]), jnp.asarray(COND[i:i + 1]), s, r)
        np.testing.assert_allclose(np.asarray(together[i:i + 1]), np.asarray(alone), rtol=1e-6)


def _toy_model(x, t, context):
    # A model whose prediction depends on x, t and the context, so a mix-up of halves shows.
    return jnp.tanh(x) * context[:, None, None, :] + t.reshape(-1, 1, 1, 1) / 1000.0


def _counting(calls: list):
    """`_toy_model`, appending the batch size of each call to `calls`."""
    def model(x, t, context):
        calls.append(x.shape[0])
        return _toy_model(x, t, context)
    return model


def test_guidance_makes_one_model_call_on_the_concatenated_batch():
    calls = []
    cond = jnp.ones((3, 4)) * 2.0
    uncond = jnp.zeros((3, 4))
    fn = classifier_free_guidance(_counting(calls), cond, uncond, jnp.array([1.0, 2.0, 3.0]))
    x = jnp.asarray(COND)
    t = jnp.full((3,), 500.0)
    out = fn(x, t)
    assert calls == [6]
    expected = guidance_combine(_toy_model(x, t, uncond), _toy_model(x, t, cond), jnp.array([1., 2., 3.]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6)


def test_no_uncond_means_single_conditional_call():
    calls = []
    cond = jnp.ones((3, 4))
    out = classifier_free_guidance(_counting(calls), cond, None, 1.0)(jnp.asarray(COND), jnp.full((3,), 10.0))
    assert calls == [3]
    np.testing.assert_allclose(np.asarray(out), np.asarray(_toy_model(jnp.asarray(COND), jnp.full((3,), 10.0), cond)))


@pytest.mark.parametrize("t,inside", [(900.0, False), (500.0, True), (50.0, False)])
def test_guidance_applies_only_inside_its_interval(t, inside):
    cond = jnp.ones((3, 4)) * 2.0
    uncond = jnp.zeros((3, 4))
    x = jnp.asarray(COND)
    ts = jnp.full((3,), t)
    out = classifier_free_guidance(_toy_model, cond, uncond, 5.0, interval=(0.2, 0.8))(x, ts)
    guided = classifier_free_guidance(_toy_model, cond, uncond, 5.0)(x, ts)
    plain = _toy_model(x, ts, cond)
    np.testing.assert_allclose(np.asarray(out), np.asarray(guided if inside else plain), rtol=1e-6)
    assert not np.allclose(np.asarray(guided), np.asarray(plain))


def test_scale_sweep_does_not_recompile():
    traces = []

    @jax.jit
    def run(x, scale):
        traces.append(1)
        return classifier_free_guidance(_toy_model, jnp.ones((3, 4)), jnp.zeros((3, 4)), scale)(
            x, jnp.full((3,), 400.0))

    for s in (1.0, 3.0, 7.5, 12.0):
        run(jnp.asarray(COND), jnp.full((3,), s))
    assert len(traces) == 1
