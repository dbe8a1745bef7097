"""Whole SD3 and Flux pipeline runs against diffusers' StableDiffusion3Pipeline / FluxPipeline:
the same tiny weights saved as a diffusers folder, loaded through `load_pretrained`, drawn from the
same starting latents; the decoded images must agree to 1e-5 (relative L2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdjax.sampling.generator import Generator
from sdjax.sampling.requests import Request
from sdjax.sampling.spec import SamplingSpec
from sdjax.weights.pretrained import load_pretrained
from tests import flow_models

SIZE, STEPS, TOKENS = 32, 4, 24
PROMPT = "A photo of a (red:1.0) Cat, 4k!"


def _relative(ours, reference) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(request, tmp_path_factory):
    family = request.param
    folder = flow_models.save_folder(family, tmp_path_factory.mktemp(family))
    model = load_pretrained(folder)
    return family, folder, model, Generator(model)


def _noise(channels: int, seed: int = 3) -> np.ndarray:
    latent = SIZE // 2  # the tiny VAE halves the size
    return np.random.default_rng(seed).standard_normal((1, latent, latent, channels)).astype(np.float32)


def _reference_latents(pipe, family, noise):
    nchw = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    if family == "flux":  # FluxPipeline takes its latents packed into 2x2 patches
        b, c, h, w = nchw.shape
        return pipe._pack_latents(nchw, b, c, h, w)
    return nchw


def _draw_both(flow, *, cfg, spec_fields=None, pipe_kwargs=None, request_fields=None,
               scheduler=None):
    family, folder, model, generator = flow
    noise = _noise(model.vae_config.latent_channels)
    pipe = flow_models.reference_pipeline(
        family, folder, **({} if scheduler is None else {"scheduler": scheduler}))
    kwargs = dict(prompt=PROMPT.replace("(red:1.0)", "red"), height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, max_sequence_length=TOKENS, output_type="np",
                  latents=_reference_latents(pipe, family, noise), **(pipe_kwargs or {}))
    with torch.no_grad():
        reference = pipe(**kwargs).images
    spec = SamplingSpec(sampler="flow_euler", steps=STEPS, height=SIZE, width=SIZE,
                        guidance=cfg != 1.0, max_sequence_length=TOKENS, **(spec_fields or {}))
    out = generator(Request(prompt=PROMPT, noise=noise, cfg_scale=cfg, **(request_fields or {})),
                    spec)
    return flow_models.to_unit_images(np.asarray(out["images"])), reference


def test_whole_pipeline_matches_diffusers(flow):
    family = flow[0]
    if family == "sd3":
        ours, reference = _draw_both(flow, cfg=4.0, pipe_kwargs=dict(guidance_scale=4.0))
    else:  # Flux-dev: the guidance scale is the model's input, no classifier-free guidance
        ours, reference = _draw_both(flow, cfg=1.0, pipe_kwargs=dict(guidance_scale=2.5),
                                     request_fields=dict(embedded_guidance=2.5))
    error = _relative(ours, reference)
    print(f"{family}: relative difference {error:.2e}")
    assert error <= 1e-5
    assert np.std(reference) > 0.01  # an image, not a constant


@pytest.mark.slow  # two more pipeline runs per family
def test_guidance_settings_change_the_image_as_in_diffusers(flow):
    """SD3: skip-layer guidance on block 1 over half the steps. Flux: true CFG with a negative
    prompt (diffusers' true_cfg_scale) at another embedded guidance."""
    family = flow[0]
    if family == "sd3":
        ours, reference = _draw_both(
            flow, cfg=3.0, spec_fields=dict(slg_layers=(1,), slg_start=0.0, slg_stop=0.6),
            request_fields=dict(slg_scale=2.0),
            pipe_kwargs=dict(guidance_scale=3.0, skip_guidance_layers=[1],
                             skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
                             skip_layer_guidance_stop=0.6))
        plain, _ = _draw_both(flow, cfg=3.0, pipe_kwargs=dict(guidance_scale=3.0))
    else:
        ours, reference = _draw_both(
            flow, cfg=2.0, request_fields=dict(embedded_guidance=2.0, negative_prompt="blurry"),
            pipe_kwargs=dict(guidance_scale=2.0, true_cfg_scale=2.0, negative_prompt="blurry"))
        plain, _ = _draw_both(flow, cfg=1.0, request_fields=dict(embedded_guidance=2.0),
                              pipe_kwargs=dict(guidance_scale=2.0))
    error = _relative(ours, reference)
    print(f"{family}: relative difference {error:.2e}")
    assert error <= 1e-5
    assert _relative(plain, ours) > 100 * 1e-5  # the setting did something
