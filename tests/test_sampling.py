"""The sampling program end to end: tiny random diffusers pipelines saved as diffusers folders,
loaded by `sdjax.load_pretrained` and by diffusers (PyTorch), sampled from the same initial latents
and compared as decoded images (PSNR); then the program's promises (compile once, seeds, variation,
guidance options, emphasis, long prompts, inpainting, progress) and its errors for bad input.

Run with `-s` to see the measured PSNR of every parity case.
"""
from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers
import transformers

import sdjax  # noqa: E402
from benchmarks.checkpoints import save_diffusers_folder  # noqa: E402
from sdjax.models.vae import AutoencoderKL  # noqa: E402
from sdjax.weights.presets import preset  # noqa: E402
from sdjax.sampling import Generator, Request, SamplingSpec  # noqa: E402
from sdjax.sampling.generator import NonFiniteLatentsError  # noqa: E402
from sdjax.sampling.program import initial_noise  # noqa: E402
from tests.helpers import to_nchw  # noqa: E402

IMAGE = 32                       # pixels; the tiny VAE halves it
LATENT = IMAGE // 2
STEPS = 8
MIN_PSNR_DB = 45.0
PROMPT = "a photo of a cat"
SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
              "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
SD_SCHEDULER = preset("sd15")["scheduler"]
CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
UNET = dict(sample_size=LATENT, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
            cross_attention_dim=32, norm_num_groups=8)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           sample_size=IMAGE)


# --- reference models ------------------------------------------------------------------------------

def randomise(model, seed: int):
    """Fan-in-scaled random weights everywhere, norm scales near 1 and biases near 0 but not equal:
    diffusers zero-initialises some layers, and a zero layer would hide a wrong conversion."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=generator)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            else:
                p.copy_(r / np.sqrt(p[0].numel()))
    return model.eval()


def sd1_parts(**unet_overrides) -> dict:
    return {
        "unet": randomise(diffusers.UNet2DConditionModel(**{**UNET, **unet_overrides}), 1),
        "vae": randomise(diffusers.AutoencoderKL(**VAE), 2),
        "text_encoder": randomise(
            transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_TEXT)), 3),
    }


def sd2_parts() -> dict:
    text = dict(CLIP_TEXT, hidden_act="gelu", num_hidden_layers=3)
    return {
        "unet": randomise(diffusers.UNet2DConditionModel(
            **UNET, use_linear_projection=True, upcast_attention=True), 4),
        "vae": randomise(diffusers.AutoencoderKL(**VAE), 5),
        "text_encoder": randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)), 6),
    }


def sdxl_parts() -> dict:
    text_2 = dict(CLIP_TEXT, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  hidden_act="gelu", projection_dim=32)
    unet = dict(UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + 64,
                use_linear_projection=True, transformer_layers_per_block=(1, 2),
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8)
    return {
        "unet": randomise(diffusers.UNet2DConditionModel(**unet), 7),
        "vae": randomise(diffusers.AutoencoderKL(**VAE, scaling_factor=0.13025), 8),
        "text_encoder": randomise(
            transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_TEXT)), 9),
        "text_encoder_2": randomise(transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**text_2)), 10),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return {
        "sd1": save_diffusers_folder(sd1_parts(), root / "sd1", scheduler=SD_SCHEDULER),
        "sd1_inpaint": save_diffusers_folder(sd1_parts(in_channels=9), root / "sd1_inpaint",
                                             scheduler=SD_SCHEDULER),
        "sd2": save_diffusers_folder(sd2_parts(), root / "sd2",
                                     scheduler={**SD_SCHEDULER, "prediction_type": "v_prediction"}),
        "sdxl": save_diffusers_folder(sdxl_parts(), root / "sdxl", scheduler=SD_SCHEDULER,
                                      pipeline_class="StableDiffusionXLPipeline"),
    }


@pytest.fixture(scope="module")
def sd1(folders):
    return Generator(sdjax.load_pretrained(folders["sd1"]))


@pytest.fixture(scope="module")
def reference_components(folders):
    """name -> the diffusers components (PyTorch models, tokenizers) of folders[name], loaded once;
    pipelines built over them (`reference`) share the models and never change them."""
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            if name == "sdxl":
                pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folders[name])
            else:
                pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                    folders[name], safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
            cache[name] = pipe.components
        return cache[name]

    return get


def reference(pipeline_class, components: dict, sampler: str):
    """A diffusers pipeline over shared components, with a fresh scheduler of the saved config."""
    scheduler = SCHEDULERS[sampler].from_config(components["scheduler"].config)
    pipe = pipeline_class(**{**components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spec_of(sampler: str, **kw) -> SamplingSpec:
    return SamplingSpec(**{"sampler": sampler, "steps": STEPS, "height": IMAGE, "width": IMAGE, **kw})


def seeded_noise(seed: int, n: int = 1) -> np.ndarray:
    """The initial noise sdjax draws for seeds seed..seed+n-1, (n, h, w, c)."""
    seeds = jnp.arange(seed, seed + n, dtype=jnp.uint32)
    return np.asarray(initial_noise(seeds, (LATENT, LATENT, 4)))


def unit(images: np.ndarray) -> np.ndarray:
    """sdjax's [-1, 1] images in diffusers' output_type='np' range."""
    return images / 2 + 0.5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def assert_parity(case: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    # Informative only if the images are not flat or clipped everywhere.
    assert theirs.std() > 0.05 and np.mean((theirs <= 0) | (theirs >= 1)) < 0.5, case
    value = psnr(ours, theirs)
    print(f"\nPSNR {case}: {value:.1f} dB (max abs diff {np.abs(ours - theirs).max():.2e})")
    assert value >= MIN_PSNR_DB, f"{case}: PSNR {value:.1f} dB < {MIN_PSNR_DB} dB"


def smooth_image() -> np.ndarray:
    """A smooth (H, W, 3) image in [0, 1]."""
    y, x = np.mgrid[0:IMAGE, 0:IMAGE].astype(np.float32) / IMAGE
    return np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), x * y], axis=-1)


# --- 1. SD 1.x parity ------------------------------------------------------------------------------

# One compiled program per sampler: in the default run SD 1.x covers DDIM, and Euler and DPM-Solver++
# run end to end through the SDXL and SD 2.x cases; `-m slow` adds them for SD 1.x too.
slow = pytest.mark.slow
TXT2IMG_CASES = [  # sampler, guidance scale, negative prompt, guidance rescale
    ("ddim", 1.0, None, 0.0), ("ddim", 7.5, "blurry, low quality", 0.0), ("ddim", 7.5, None, 0.7),
    pytest.param("euler", 1.0, None, 0.0, marks=slow), pytest.param("euler", 7.5, None, 0.0, marks=slow),
    pytest.param("dpmpp_2m", 1.0, None, 0.0, marks=slow),
    pytest.param("dpmpp_2m", 7.5, "blurry, low quality", 0.0, marks=slow),
]


@pytest.mark.parametrize("sampler,scale,negative,rescale", TXT2IMG_CASES)
def test_txt2img_matches_diffusers(sd1, reference_components, sampler, scale, negative, rescale):
    seed = 5
    ours = sd1(Request(PROMPT, negative_prompt=negative, seed=seed, cfg_scale=scale,
                       guidance_rescale=rescale), spec_of(sampler))["images"]
    pipe = reference(diffusers.StableDiffusionPipeline, reference_components("sd1"), sampler)
    theirs = pipe(PROMPT, negative_prompt=negative, guidance_scale=scale, guidance_rescale=rescale,
                  num_inference_steps=STEPS, height=IMAGE, width=IMAGE,
                  latents=to_nchw(seeded_noise(seed)), output_type="np").images
    assert_parity(f"sd1 txt2img {sampler} cfg={scale} neg={negative is not None} rescale={rescale}",
                  unit(ours), theirs)


def _deterministic(monkeypatch, module) -> dict:
    """diffusers' img2img and inpainting pipelines (`module`) draw the VAE posterior sample and
    the noise from their generator; sdjax uses the posterior mode and its own seeded noise. Make
    diffusers do the same: it draws the (NHWC) noise the test puts in the returned dict's "value"."""
    noise = {}
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None, layout=None:
                        to_nchw(noise["value"]).to(dtype))
    return noise


@pytest.fixture
def deterministic_img2img(monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    return _deterministic(monkeypatch, module)


@pytest.mark.parametrize("sampler,scale", [
    ("ddim", 7.5), pytest.param("euler", 7.5, marks=slow), pytest.param("dpmpp_2m", 1.0, marks=slow)])
def test_img2img_matches_diffusers(sd1, reference_components, deterministic_img2img, sampler,
                                   scale):
    seed, strength = 9, 0.6
    image = smooth_image()
    ours = sd1(Request(PROMPT, seed=seed, cfg_scale=scale, init_image=2 * image - 1),
               spec_of(sampler, mode="img2img", strength=strength))["images"]
    deterministic_img2img["value"] = seeded_noise(seed)
    pipe = reference(diffusers.StableDiffusionImg2ImgPipeline, reference_components("sd1"), sampler)
    theirs = pipe(PROMPT, image=image[None], strength=strength, guidance_scale=scale,
                  num_inference_steps=STEPS, output_type="np").images
    assert_parity(f"sd1 img2img {sampler} cfg={scale} strength={strength}", unit(ours), theirs)


# --- 2. SDXL and 3. SD 2.x parity ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl(folders):
    return Generator(sdjax.load_pretrained(folders["sdxl"]))


@pytest.mark.parametrize("scale,negative", [(1.0, None), (5.0, None), (5.0, "blurry")])
def test_sdxl_txt2img_matches_diffusers(sdxl, reference_components, scale, negative):
    """SDXL conventions both sides: penultimate hidden states of both encoders without the final
    norm, concatenated; the second encoder's projected pooled output; add_time_ids (original size,
    crop (0, 0), target size) = (H, W, 0, 0, H, W) for cond and uncond; no negative prompt means an
    all-zero uncond (force_zeros_for_empty_prompt)."""
    seed, sampler = 3, "euler"
    assert sdxl.model.family == "sdxl"
    ours = sdxl(Request(PROMPT, negative_prompt=negative, seed=seed, cfg_scale=scale),
                spec_of(sampler))["images"]
    components = reference_components("sdxl")
    assert components["text_encoder_2"] is not None and components["tokenizer_2"] is not None
    pipe = reference(diffusers.StableDiffusionXLPipeline, components, sampler)
    assert pipe.config.force_zeros_for_empty_prompt
    theirs = pipe(PROMPT, negative_prompt=negative, guidance_scale=scale, num_inference_steps=STEPS,
                  height=IMAGE, width=IMAGE, latents=to_nchw(seeded_noise(seed)),
                  output_type="np").images
    assert_parity(f"sdxl txt2img {sampler} cfg={scale} neg={negative is not None}", unit(ours), theirs)


def test_sd2_v_prediction_txt2img_matches_diffusers(folders, reference_components):
    seed, sampler, scale, negative = 4, "dpmpp_2m", 7.5, "ugly"
    model = sdjax.load_pretrained(folders["sd2"])
    assert model.family == "sd2" and model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.tokenizers[0].pad_token == "!"
    ours = Generator(model)(Request(PROMPT, negative_prompt=negative, seed=seed, cfg_scale=scale),
                            spec_of(sampler))["images"]
    pipe = reference(diffusers.StableDiffusionPipeline, reference_components("sd2"), sampler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    theirs = pipe(PROMPT, negative_prompt=negative, guidance_scale=scale, num_inference_steps=STEPS,
                  height=IMAGE, width=IMAGE, latents=to_nchw(seeded_noise(seed)),
                  output_type="np").images
    assert_parity(f"sd2 v-pred txt2img {sampler} cfg={scale} neg=True", unit(ours), theirs)


# --- 4. properties ----------------------------------------------------------------------------------

def test_new_prompt_seed_scale_or_negative_does_not_retrace(sd1):
    spec = spec_of("ddim")
    first = sd1(Request(PROMPT, seed=1), spec)["images"]
    traces = sd1.traces
    others = [
        sd1(Request("a red house on a hill", seed=1), spec)["images"],
        sd1(Request(PROMPT, seed=2), spec)["images"],
        sd1(Request(PROMPT, seed=1, cfg_scale=3.0), spec)["images"],
        sd1(Request(PROMPT, seed=1, negative_prompt="dark"), spec)["images"],
        sd1(Request(PROMPT, seed=1, guidance_rescale=0.5), spec)["images"],
    ]
    assert sd1.traces == traces
    # Each is a real change of the data the program reads.
    for other in others:
        assert np.abs(other - first).max() > 1e-3


def test_batch_of_four_equals_four_batches_of_one(sd1):
    spec, seed = spec_of("ddim"), 20
    prompts = [PROMPT, "a dog", "a red car", "a tree"]
    together = sd1(Request(prompts, seed=seed, num_images=4, cfg_scale=[1.0, 7.5, 5.0, 7.5]),
                   spec)["images"]
    assert together.shape == (4, IMAGE, IMAGE, 3)
    for i, (prompt, scale) in enumerate(zip(prompts, [1.0, 7.5, 5.0, 7.5])):
        alone = sd1(Request(prompt, seed=seed + i, cfg_scale=scale), spec)["images"]
        np.testing.assert_array_equal(together[i], alone[0], err_msg=f"image {i}")


def test_variation_strength_zero_gives_the_seed_and_one_the_subseed(sd1):
    spec, seed, subseed = spec_of("ddim"), 30, 77
    plain = sd1(Request(PROMPT, seed=seed), spec)["images"]
    of_subseed = sd1(Request(PROMPT, seed=subseed), spec)["images"]
    zero = sd1(Request(PROMPT, seed=seed, subseed=subseed, subseed_strength=0.0), spec)["images"]
    one = sd1(Request(PROMPT, seed=seed, subseed=subseed, subseed_strength=1.0), spec)["images"]
    half = sd1(Request(PROMPT, seed=seed, subseed=subseed, subseed_strength=0.5), spec)["images"]
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_allclose(one, of_subseed, atol=1e-5)
    assert np.abs(half - plain).max() > 1e-2 and np.abs(half - of_subseed).max() > 1e-2
    # The interpolation itself at strength 0: exactly the seed's noise.
    seeds, subseeds = jnp.array([seed], jnp.uint32), jnp.array([subseed], jnp.uint32)
    np.testing.assert_array_equal(initial_noise(seeds, (4, 4, 4), subseeds, jnp.zeros(1)),
                                  initial_noise(seeds, (4, 4, 4)))


def test_guidance_rescale_and_interval_change_the_image(sd1):
    request = Request(PROMPT, seed=40, cfg_scale=7.5)
    plain = sd1(request, spec_of("ddim"))["images"]
    rescaled = sd1(dataclasses.replace(request, guidance_rescale=0.7), spec_of("ddim"))["images"]
    interval = sd1(request, spec_of("ddim", guidance_interval=(0.3, 0.8)))["images"]
    assert np.abs(rescaled - plain).max() > 1e-2
    assert np.abs(interval - plain).max() > 1e-2


def test_neutral_emphasis_changes_nothing_and_strong_emphasis_changes_the_image(sd1):
    spec = spec_of("ddim")
    plain = sd1(Request("a photo of a cat", seed=50), spec)["images"]
    neutral = sd1(Request("a photo of a (cat:1.0)", seed=50), spec)["images"]
    strong = sd1(Request("a photo of a (cat:1.5)", seed=50), spec)["images"]
    np.testing.assert_array_equal(neutral, plain)
    assert np.abs(strong - plain).max() > 1e-2


def test_long_prompts_run_in_chunks_and_break_starts_a_new_chunk(sd1):
    long_prompt = ", ".join(["a small red cat on a green hill"] * 12)   # > 77 tokens
    assert len(sd1.model.tokenizers[0].encode(long_prompt)) > 77
    prompts = [long_prompt, "a cat BREAK a dog", "a cat a dog"]
    batch = sd1.prepare(Request(prompts, num_images=3), spec_of("ddim"))
    assert batch["ids"].shape[2] >= 2 and batch["neg_ids"].shape == batch["ids"].shape
    out = sd1(Request(prompts, seed=60, num_images=3), spec_of("ddim"))
    assert out["images"].shape == (3, IMAGE, IMAGE, 3) and out["finite"].all()
    assert np.abs(out["images"][1] - out["images"][2]).max() > 1e-3


def test_progress_bar_does_not_change_images(sd1):
    request = Request(PROMPT, seed=70)
    quiet = sd1(request, spec_of("ddim"))["images"]
    shown = sd1(request, spec_of("ddim", progress=True))["images"]
    np.testing.assert_array_equal(shown, quiet)


def _reconstruction(generator: Generator, image: np.ndarray) -> np.ndarray:
    vae = AutoencoderKL(generator.arch.vae)
    params = {"params": generator.model.params["vae"]}
    posterior = vae.apply(params, jnp.asarray(image)[None], method=AutoencoderKL.encode)
    return np.asarray(vae.apply(params, posterior.mode(), method=AutoencoderKL.decode))[0]


def test_inpaint_with_mask_blending_keeps_the_unmasked_region(sd1):
    """The kept latents end as the init image's (scaled) posterior mode, exactly. In pixels that is
    exact with nothing to repaint; with a half mask the VAE decoder's mid-block attention mixes
    every latent into every pixel, so the kept half is only closer to the reconstruction."""
    image = 2 * smooth_image() - 1
    spec = spec_of("ddim", mode="inpaint")
    recon = np.clip(_reconstruction(sd1, image), -1, 1)
    # The latents, not the overlay of the init image (tests/test_inpaint_overlay.py), are the point.
    nothing = sd1(Request(PROMPT, seed=80, init_image=image, mask=np.zeros((IMAGE, IMAGE)),
                          inpaint_overlay=False), spec)
    np.testing.assert_allclose(nothing["images"][0], recon, atol=1e-4)
    mask = np.zeros((IMAGE, IMAGE), np.float32)
    mask[:, : IMAGE // 2] = 1                                 # repaint the left half
    out = sd1(Request(PROMPT, seed=80, init_image=image, mask=mask, inpaint_overlay=False), spec)
    assert out["images"].shape == (1, IMAGE, IMAGE, 3)
    error = np.abs(out["images"][0] - recon)
    assert error[:, : IMAGE // 2].mean() > 1.2 * error[:, IMAGE // 2:].mean()


@pytest.fixture(scope="module")
def sd1_inpaint(folders):
    return Generator(sdjax.load_pretrained(folders["sd1_inpaint"]))


@pytest.fixture
def deterministic_inpaint(monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    return _deterministic(monkeypatch, module)


@pytest.mark.parametrize("unet,strength", [
    ("blend", 1.0), ("nine", 1.0), pytest.param("blend", 0.75, marks=slow)])
def test_inpaint_matches_diffusers(sd1, sd1_inpaint, reference_components, deterministic_inpaint,
                                   unet, strength):
    """Ordinary U-Net with mask blending, and the 9-channel inpainting U-Net. The mask is aligned
    to the latent grid: diffusers resizes it (nearest), sdjax repaints a latent if any pixel is."""
    from PIL import Image

    generator = sd1 if unet == "blend" else sd1_inpaint
    seed, scale = 11, 7.5
    image = smooth_image()
    mask = np.zeros((IMAGE, IMAGE), np.float32)
    mask[8:24, 4:20] = 1
    # diffusers' pipeline lays no init image over the result (sdjax's overlay off).
    ours = generator(Request(PROMPT, seed=seed, cfg_scale=scale, init_image=2 * image - 1, mask=mask,
                             inpaint_overlay=False),
                     spec_of("ddim", mode="inpaint", strength=strength))
    assert ours["images"].shape == (1, IMAGE, IMAGE, 3)
    deterministic_inpaint["value"] = seeded_noise(seed)
    components = reference_components("sd1" if unet == "blend" else "sd1_inpaint")
    pipe = reference(diffusers.StableDiffusionInpaintPipeline, components, "ddim")
    theirs = pipe(PROMPT, image=image[None], mask_image=Image.fromarray((mask * 255).astype(np.uint8)),
                  strength=strength, guidance_scale=scale, num_inference_steps=STEPS, height=IMAGE,
                  width=IMAGE, output_type="np").images
    assert_parity(f"sd1 inpaint {unet} ddim cfg={scale} strength={strength}", unit(ours["images"]),
                  theirs)


def test_inpainting_unet_needs_inpaint_mode(sd1_inpaint):
    assert sd1_inpaint.arch.unet.in_channels == 9
    with pytest.raises(ValueError, match="input channels"):
        sd1_inpaint.prepare(Request(PROMPT), spec_of("ddim"))


# --- 5. bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    (spec_of("no_such_sampler"), r"unknown sampler 'no_such_sampler'; valid names: .*ddim.*euler"),
    (spec_of("ddim", steps=0), "steps must be >= 1, got 0"),
    (spec_of("ddim", height=36), "height must be a positive multiple of 8, got 36"),
    (spec_of("ddim", width=20), "width must be a positive multiple of 8, got 20"),
    (spec_of("ddim", mode="img2img", strength=0.0), r"strength must be in \(0, 1\], got 0.0"),
    (spec_of("ddim", mode="img2img", strength=1.5), r"strength must be in \(0, 1\], got 1.5"),
])
def test_bad_spec_is_rejected(sd1, spec, match):
    with pytest.raises(ValueError, match=match):
        sd1(Request(PROMPT, init_image=np.zeros((IMAGE, IMAGE, 3), np.float32)), spec)


def test_bad_images_are_rejected(sd1):
    image = np.zeros((IMAGE, IMAGE, 3), np.float32)
    with pytest.raises(ValueError, match="mode 'img2img' needs an init image"):
        sd1.prepare(Request(PROMPT), spec_of("ddim", mode="img2img"))
    with pytest.raises(ValueError, match="mask is 16x16 but the image is 32x32"):
        sd1.prepare(Request(PROMPT, init_image=image, mask=np.zeros((16, 16))),
                    spec_of("ddim", mode="inpaint"))
    with pytest.raises(ValueError, match="init image is 64x64 but the request is 32x32"):
        sd1.prepare(Request(PROMPT, init_image=np.zeros((64, 64, 3))), spec_of("ddim", mode="img2img"))
    with pytest.raises(ValueError, match="mode 'inpaint' needs a mask"):
        sd1.prepare(Request(PROMPT, init_image=image), spec_of("ddim", mode="inpaint"))


def test_nan_latents_raise_naming_the_seeds(sd1):
    broken = copy.copy(sd1)          # shares the compiled programs: same shapes, new values
    params = jax.tree.map(lambda x: x, sd1.params)
    params["unet"]["conv_in"]["kernel"] = params["unet"]["conv_in"]["kernel"] * jnp.nan
    broken.params = params
    with pytest.raises(NonFiniteLatentsError, match=r"seed\(s\) \[100\]"):
        broken(Request(PROMPT, seed=100), spec_of("ddim"))
    out = broken(Request(PROMPT, seed=100), spec_of("ddim"), check_finite=False)
    assert not out["finite"].any()


@pytest.mark.slow  # compiles two more programs
def test_half_precision_runs_and_stays_near_float32():
    """float16 (VAE upcast to float32 where the config asks, as SDXL's does) and bfloat16 compute
    give finite images close to float32's."""
    from sdjax.weights.presets import random_pretrained

    model = random_pretrained("tiny", seed=2)
    spec = SamplingSpec(sampler="euler", steps=3, height=32, width=32)
    request = Request(prompt="a red circle", seed=3)
    reference = Generator(model)(request, spec)["images"]
    for dtype in (np.float16, "bfloat16"):
        images = Generator(model, dtype=dtype)(request, spec)["images"]
        assert np.isfinite(images).all()
        assert np.abs(images - reference).max() < 0.1, dtype
