"""Sampling with ControlNets against diffusers' ControlNet pipelines (PyTorch), from the same initial
latents: txt2img with guidance start/end, guess mode and several ControlNets, img2img and inpaint
with control, SDXL; then the promises of the program (scales, start/end and images are data: no
retrace; a per-image scale of 0 is the model without control; the exported-program cache) and the
errors for a ControlNet that does not fit the model.

Run with `-s` to see the measured relative differences.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import diffusers

import sdjax
from benchmarks.checkpoints import save_diffusers_folder
from sdjax.sampling import Generator, Request, SamplingSpec
from sdjax.sampling.controls import Control, step_keep
from tests.helpers import to_nchw
from tests.test_sampling import (IMAGE, SCHEDULERS, SD_SCHEDULER, STEPS, _deterministic, randomise,
                                 sd1_parts, sdxl_parts, seeded_noise, smooth_image, unit)

MAX_RELATIVE = 1e-5   # relative L2 difference of the decoded images
PROMPT = "a photo of a cat"
slow = pytest.mark.slow


def relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def assert_parity(case: str, ours: np.ndarray, theirs: np.ndarray, without: np.ndarray) -> None:
    """`ours` (sdjax, [-1, 1]) equals `theirs` (diffusers, [0, 1]); `without` (sdjax without the
    ControlNet) shows the control changed the image, so the comparison means something."""
    ours, without = unit(ours), unit(without)
    value = relative(ours, theirs)
    print(f"\n{case}: relative difference {value:.2e}, control's effect {relative(without, theirs):.2e}")
    assert relative(without, theirs) > 100 * MAX_RELATIVE, f"{case}: the control changes nothing"
    assert value <= MAX_RELATIVE, f"{case}: relative difference {value:.2e} > {MAX_RELATIVE}"


def control_images(seed: int) -> np.ndarray:
    """A control image in [0, 1], (H, W, 3): blocky, like an edge or mask map."""
    rng = np.random.RandomState(seed)
    coarse = rng.rand(4, 4, 3).astype(np.float32)
    return np.kron(coarse, np.ones((IMAGE // 4, IMAGE // 4, 1), np.float32))


def torch_image(image: np.ndarray) -> torch.Tensor:
    return torch.tensor(image).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SD 1.x, two ControlNets made from its U-Net (random weights), an SDXL and one of its
    ControlNets, saved as diffusers folders; the torch models for the references."""
    root = tmp_path_factory.mktemp("controlnet_sampling")
    parts = sd1_parts()
    xl_parts = sdxl_parts()
    out = {"parts": parts, "xl_parts": xl_parts,
           "sd1": save_diffusers_folder(parts, root / "sd1", scheduler=SD_SCHEDULER),
           "sdxl": save_diffusers_folder(xl_parts, root / "sdxl", scheduler=SD_SCHEDULER,
                                         pipeline_class="StableDiffusionXLPipeline")}
    for name, unet, seed in (("cn_a", parts["unet"], 21), ("cn_b", parts["unet"], 22),
                             ("cn_xl", xl_parts["unet"], 23)):
        # The conditioning embedding downsamples as much as the tiny VAE (2x): two widths.
        model = randomise(diffusers.ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(8, 16)), seed)
        model.save_pretrained(root / name)
        out[name], out[f"{name}_torch"] = str(root / name), model
    return out


@pytest.fixture(scope="module")
def sd1(models):
    return Generator(sdjax.load_pretrained(models["sd1"]), exported_programs=False)


@pytest.fixture(scope="module")
def components(models):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        models["sd1"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return {k: v for k, v in pipe.components.items() if k != "image_encoder"}


def reference(pipeline_class, components: dict, controlnet, sampler: str):
    pipe = pipeline_class(**components, controlnet=controlnet)
    pipe.scheduler = SCHEDULERS[sampler].from_config(components["scheduler"].config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spec_of(sampler: str = "ddim", **kw) -> SamplingSpec:
    return SamplingSpec(**{"sampler": sampler, "steps": STEPS, "height": IMAGE, "width": IMAGE, **kw})


# --- parity ----------------------------------------------------------------------------------------

# Each case compiles a program: the default run keeps start/end and guess mode, `-m slow` adds
# the rest (and img2img, inpaint, SDXL, 8 devices below).
TXT2IMG_CASES = [  # sampler, conditioning scale, start, end, guess mode, guidance scale
    pytest.param("ddim", 0.8, 0.0, 1.0, False, 7.5, marks=slow),
    ("ddim", 1.0, 0.2, 0.7, False, 7.5),   # steps 0-1 and 6-7 of 8 run without the ControlNet
    ("ddim", 0.8, 0.0, 1.0, True, 7.5),    # guess mode: the unconditional half sees no control
    pytest.param("ddim", 1.2, 0.1, 0.9, False, 1.0, marks=slow),   # no guidance: one branch
    pytest.param("euler", 0.8, 0.0, 0.9, True, 7.5, marks=slow),
    pytest.param("dpmpp_2m", 0.8, 0.3, 1.0, False, 7.5, marks=slow),
]


@pytest.mark.parametrize("sampler,scale,start,end,guess,cfg", TXT2IMG_CASES)
def test_txt2img_with_a_controlnet_matches_diffusers(models, sd1, components, sampler, scale, start,
                                                     end, guess, cfg):
    seed, image = 3, control_images(0)
    spec = spec_of(sampler, guess_mode=guess, guidance=cfg != 1.0)
    ours = sd1(Request(PROMPT, seed=seed, cfg_scale=cfg, controls=[
        Control(models["cn_a"], image, scale=scale, start=start, end=end)]), spec)["images"]
    without = sd1(Request(PROMPT, seed=seed, cfg_scale=cfg), spec_of(sampler, guidance=cfg != 1.0))
    pipe = reference(diffusers.StableDiffusionControlNetPipeline, components,
                     models["cn_a_torch"], sampler)
    theirs = pipe(PROMPT, image=torch_image(image), guidance_scale=cfg,
                  controlnet_conditioning_scale=scale, control_guidance_start=start,
                  control_guidance_end=end, guess_mode=guess, num_inference_steps=STEPS,
                  height=IMAGE, width=IMAGE, latents=to_nchw(seeded_noise(seed)),
                  output_type="np").images
    assert_parity(f"txt2img {sampler} scale={scale} start={start} end={end} guess={guess} "
                  f"cfg={cfg}", ours, theirs, without["images"])


def test_two_controlnets_add_up_as_diffusers_multi_controlnet(models, sd1, components):
    seed, images = 4, (control_images(1), control_images(2))
    ours = sd1(Request(PROMPT, seed=seed, cfg_scale=7.5, controls=[
        Control(models["cn_a"], images[0], scale=0.7, start=0.0, end=0.8),
        Control(models["cn_b"], images[1], scale=1.1, start=0.25, end=1.0)]), spec_of())["images"]
    one = sd1(Request(PROMPT, seed=seed, cfg_scale=7.5, controls=[
        Control(models["cn_a"], images[0], scale=0.7, start=0.0, end=0.8)]), spec_of())["images"]
    pipe = reference(diffusers.StableDiffusionControlNetPipeline, components,
                     [models["cn_a_torch"], models["cn_b_torch"]], "ddim")
    theirs = pipe(PROMPT, image=[torch_image(i) for i in images], guidance_scale=7.5,
                  controlnet_conditioning_scale=[0.7, 1.1], control_guidance_start=[0.0, 0.25],
                  control_guidance_end=[0.8, 1.0], num_inference_steps=STEPS, height=IMAGE,
                  width=IMAGE, latents=to_nchw(seeded_noise(seed)), output_type="np").images
    assert_parity("two ControlNets", ours, theirs, one)


@pytest.fixture
def deterministic_controlnet_img2img(monkeypatch):
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as module

    return _deterministic(monkeypatch, module)


@slow
def test_img2img_with_a_controlnet_matches_diffusers(models, sd1, components,
                                                     deterministic_controlnet_img2img):
    """The start/end fractions count the steps img2img runs (diffusers' convention)."""
    seed, strength, image = 6, 0.75, control_images(3)
    init = smooth_image()
    spec = spec_of(mode="img2img", strength=strength)
    ours = sd1(Request(PROMPT, seed=seed, cfg_scale=7.5, init_image=2 * init - 1, controls=[
        Control(models["cn_a"], image, scale=0.9, start=0.2, end=1.0)]), spec)["images"]
    without = sd1(Request(PROMPT, seed=seed, cfg_scale=7.5, init_image=2 * init - 1), spec)
    deterministic_controlnet_img2img["value"] = seeded_noise(seed)
    pipe = reference(diffusers.StableDiffusionControlNetImg2ImgPipeline, components,
                     models["cn_a_torch"], "ddim")
    theirs = pipe(PROMPT, image=init[None], control_image=torch_image(image), strength=strength,
                  guidance_scale=7.5, controlnet_conditioning_scale=0.9, control_guidance_start=0.2,
                  num_inference_steps=STEPS, height=IMAGE, width=IMAGE, output_type="np").images
    assert_parity("img2img ddim strength=0.75", ours, theirs, without["images"])


@pytest.fixture
def deterministic_controlnet_inpaint(monkeypatch):
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as module

    return _deterministic(monkeypatch, module)


@slow
def test_inpaint_with_a_controlnet_matches_diffusers(models, sd1, components,
                                                     deterministic_controlnet_inpaint):
    from PIL import Image

    seed, image, init = 7, control_images(4), smooth_image()
    mask = np.zeros((IMAGE, IMAGE), np.float32)
    mask[8:24, 4:20] = 1
    spec = spec_of(mode="inpaint", strength=1.0)
    request = dict(seed=seed, cfg_scale=7.5, init_image=2 * init - 1, mask=mask,
                   inpaint_overlay=False)
    ours = sd1(Request(PROMPT, controls=[Control(models["cn_a"], image, scale=1.0)], **request),
               spec)["images"]
    without = sd1(Request(PROMPT, **request), spec)["images"]
    deterministic_controlnet_inpaint["value"] = seeded_noise(seed)
    pipe = reference(diffusers.StableDiffusionControlNetInpaintPipeline, components,
                     models["cn_a_torch"], "ddim")
    theirs = pipe(PROMPT, image=init[None], mask_image=Image.fromarray((mask * 255).astype(np.uint8)),
                  control_image=torch_image(image), strength=1.0, guidance_scale=7.5,
                  controlnet_conditioning_scale=1.0,  # this pipeline's default is 0.5
                  num_inference_steps=STEPS, height=IMAGE, width=IMAGE, output_type="np").images
    assert_parity("inpaint ddim", ours, theirs, without)


@slow
def test_sdxl_with_a_controlnet_matches_diffusers(models):
    seed, image = 8, control_images(5)
    generator = Generator(sdjax.load_pretrained(models["sdxl"]), exported_programs=False)
    ours = generator(Request(PROMPT, seed=seed, cfg_scale=6.0, controls=[
        Control(models["cn_xl"], image, scale=0.8, start=0.0, end=0.75)]), spec_of())["images"]
    without = generator(Request(PROMPT, seed=seed, cfg_scale=6.0), spec_of())["images"]
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    pipe = reference(diffusers.StableDiffusionXLControlNetPipeline,
                     {k: v for k, v in base.components.items()
                      if k not in ("image_encoder", "feature_extractor")},
                     models["cn_xl_torch"], "ddim")
    theirs = pipe(PROMPT, image=torch_image(image), guidance_scale=6.0,
                  controlnet_conditioning_scale=0.8, control_guidance_end=0.75,
                  num_inference_steps=STEPS, height=IMAGE, width=IMAGE,
                  latents=to_nchw(seeded_noise(seed)), output_type="np").images
    assert_parity("sdxl ddim", ours, theirs, without)


# --- the program's promises ------------------------------------------------------------------------

def test_step_keep_follows_diffusers_start_end_rule():
    steps = 10
    for start, end in ((0.0, 1.0), (0.2, 0.7), (0.15, 0.85), (0.3, 0.3 + 1e-9), (0.0, 0.05)):
        expected = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
        assert step_keep(start, end, steps).tolist() == expected
    assert step_keep(0.2, 0.7, 10).tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]


def test_scales_start_end_and_images_are_data_and_scale_zero_is_no_control(models, sd1):
    """One program for every scale, start/end and image; a per-image scale of 0 draws what the
    model draws without the ControlNet, and image i of a batch equals the same image alone."""
    spec = spec_of()
    control = lambda **kw: Control(models["cn_a"], control_images(0), **kw)
    first = sd1(Request(PROMPT, seed=9, num_images=2, cfg_scale=7.5,
                        controls=[control(scale=[0.0, 1.0])]), spec)["images"]
    alone = sd1(Request(PROMPT, seed=10, cfg_scale=7.5, controls=[control(scale=1.0)]), spec)
    traces = sd1.traces
    other = sd1(Request(PROMPT, seed=9, num_images=2, cfg_scale=7.5, controls=[
        Control(models["cn_a"], [control_images(6), control_images(7)], scale=[0.5, 1.5],
                start=0.1, end=0.6)]), spec)["images"]
    stacked = sd1(Request(PROMPT, seed=9, num_images=2, cfg_scale=7.5, controls=[
        Control(models["cn_a"], np.stack([control_images(6), control_images(7)]), scale=[0.5, 1.5],
                start=0.1, end=0.6)]), spec)["images"]
    assert np.array_equal(stacked, other), "a (B, H, W, C) array is one control image per image"
    assert sd1.traces == traces, "a new scale, start/end or control image retraced the program"
    assert np.array_equal(alone["images"][0], first[1]), "image 1 of the batch != the image alone"
    plain = sd1(Request(PROMPT, seed=9, cfg_scale=7.5), spec)["images"][0]
    assert np.abs(first[0] - plain).max() <= 1e-5
    assert np.abs(first[1] - plain).max() > 0.05 and np.abs(other - first).max() > 0.05


def test_an_exported_program_serves_every_scale(models, tmp_path):
    model = sdjax.load_pretrained(models["sd1"])
    request = lambda scale: Request(PROMPT, seed=2, cfg_scale=7.5, controls=[
        Control(models["cn_a"], control_images(0), scale=scale)])
    first = Generator(model, exported_programs=str(tmp_path))
    drawn = first(request(0.6), spec_of())["images"]
    first(request(1.4), spec_of())
    assert [e["outcome"] for e in first.program_log] == ["miss"] and first.traces == 1
    second = Generator(model, exported_programs=str(tmp_path))
    assert np.array_equal(second(request(0.6), spec_of())["images"], drawn)
    assert [e["outcome"] for e in second.program_log] == ["hit"] and second.traces == 0


def test_a_controlnet_of_another_model_is_an_error_naming_the_field(models, tmp_path):
    generator = Generator(sdjax.load_pretrained(models["sdxl"]), exported_programs=False)
    with pytest.raises(ValueError, match="cross_attention_dim|block_out_channels|layers"):
        generator(Request(PROMPT, controls=[Control(models["cn_a"], control_images(0))]),
                  spec_of())


@pytest.mark.parametrize("control,message", [
    (dict(start=0.6, end=0.4), "start 0.6 and end 0.4"),
    (dict(image="no/such/control.png"), "no such file"),
    (dict(preprocess="sobel"), "unknown preprocess"),
    (dict(scale=[1.0, 2.0, 3.0]), "3 entries"),
    (dict(controlnet="no/such/controlnet"), "no such file or folder"),
])
def test_bad_controls_are_errors_naming_the_culprit(models, sd1, control, message):
    fields = {"controlnet": models["cn_a"], "image": control_images(0), **control}
    with pytest.raises(ValueError, match=message):
        sd1(Request(PROMPT, num_images=2, controls=[Control(**fields)]), spec_of())


# 8 devices in a subprocess, three layouts.
@slow
def test_controlnet_images_are_bit_identical_across_devices_jit_pmap_and_fsdp():
    from tests.helpers import json_result, run_python

    result = json_result(run_python("-m", "tests.controlnet_sampling_check", devices=8, timeout=900))
    assert result["control_changes_images"] > 0.05, result
    assert result["scale_zero_max_abs_diff"] <= 1e-5, result
    assert all(result["bit_identical"].values()), result["max_abs_diff"]
    assert result["traces_after_scale_change"] == {"jit8": 0, "pmap8": 0, "fsdp2": 0}
