"""Prompt in, image out: text encoding, seeded noise, the denoising scan and the VAE decode, as one
compiled program per (model, shapes, sampler, step count), run data-parallel over a device mesh.

Seeds: image i of a request with seed s uses seed s + i; its initial noise, its sampler noise and
its VAE sample are all derived from `jax.random.key(s + i)`, never from a key split across the
batch, so an image is the same whatever the batch size, device count or parallel mode.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdjax.diffusion import samplers as samplers_lib
from sdjax.diffusion.guidance import classifier_free_guidance, skip_layer_term
from sdjax.models.controlnet import ControlNet
from sdjax.models.layers import model_variables
from sdjax.models.unet import UNet
from sdjax.models.vae import AutoencoderKL, scale_latents, unscale_latents
from sdjax.sampling.spec import SamplingSpec
from sdjax.text.conditioning import encode_text
from sdjax.weights.architecture import Architecture, transformer_velocity

# Streams of randomness derived from one image's key (fold_in), kept apart so that, e.g., turning on
# a stochastic sampler never changes the initial noise.
_NOISE_STREAM, _SAMPLER_STREAM, _VAE_STREAM = 0, 1, 2
# The sdjax sources the sampling program is traced from (relative to the package): an exported
# program is keyed by their digest, so editing them rebuilds it. tests/test_exported_programs.py
# checks that importing this module imports nothing of sdjax outside them.
PROGRAM_SOURCES = ("__init__.py", "sampling/__init__.py", "sampling/program.py", "sampling/spec.py",
                   "parallel.py", "text", "weights/__init__.py", "weights/architecture.py",
                   "models", "diffusion")


# --- randomness ------------------------------------------------------------------------------------

def image_keys(seeds: jax.Array) -> jax.Array:
    """One PRNG key per image from its seed (uint32)."""
    return jax.vmap(jax.random.key)(seeds)


def initial_noise(seeds: jax.Array, shape: tuple[int, ...], subseeds: Optional[jax.Array] = None,
                  subseed_strength: Optional[jax.Array] = None) -> jax.Array:
    """Unit normal noise (B, *shape) from per-image seeds; with variation seeds, the WebUI's slerp
    from the seed's noise towards the subseed's by `subseed_strength`."""
    def noise_of(s):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _NOISE_STREAM), shape))(
            image_keys(s))

    noise = noise_of(seeds)
    if subseeds is None:
        return noise
    return slerp(noise, noise_of(subseeds), subseed_strength)


def slerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """Spherical interpolation per image (leading axis), falling back to lerp for parallel vectors."""
    t = jnp.reshape(t, (-1,) + (1,) * (a.ndim - 1))
    axes = tuple(range(1, a.ndim))
    # jnp.linalg.norm takes at most two axes; the latents have three.
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))
    a_unit = a / norm(a)
    b_unit = b / norm(b)
    dot = jnp.sum(a_unit * b_unit, axis=axes, keepdims=True)
    omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    so = jnp.sin(omega)
    safe = jnp.where(so == 0, 1.0, so)
    spherical = (jnp.sin((1.0 - t) * omega) / safe) * a + (jnp.sin(t * omega) / safe) * b
    linear = (1.0 - t) * a + t * b
    return jnp.where(jnp.abs(dot) > 0.9995, linear, spherical)




# --- the program -----------------------------------------------------------------------------------

def _progress_callback(steps: int, microbatches: int):
    """A host-side tqdm bar fed from inside the compiled loop: (micro-batch, step) -> position."""
    from tqdm.auto import tqdm

    total = steps * microbatches
    state = {"bar": None, "done": 0}

    def update(micro, step):
        position = int(micro) * steps + int(step) + 1
        if state["bar"] is None or (position == 1 and state["done"] >= total):
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=total, desc="denoising", unit="step", leave=False)
            state["done"] = 0
        # Devices run their shares in parallel and each reports: count every position once.
        if position > state["done"]:
            state["bar"].update(position - state["done"])
            state["done"] = position
            if position >= total:
                state["bar"].close()

    return update


def generate_images(arch: Architecture, spec: SamplingSpec, params: dict, batch: dict) -> dict:
    """The whole sampling program for one device's share of the batch (pure; the same function
    runs under jit + shard_map and under pmap), micro-batch after micro-batch.

    batch: see `_generate_microbatch`. Returns images (B, H, W, 3) in [-1, 1] and finite (B,).
    """
    n = batch["seeds"].shape[0]
    m = min(spec.microbatch, n)
    if n % m:
        raise ValueError(f"a device's batch of {n} is not a multiple of microbatch {m}")
    micro = jax.tree.map(lambda x: x.reshape((n // m, m) + x.shape[1:]), batch)
    progress = _progress_callback(spec.steps - spec.start_step, n // m) if spec.progress else None

    def one(args):
        index, chunk = args
        on_step = None
        if progress is not None:
            on_step = lambda i: jax.debug.callback(progress, index, i - spec.start_step, ordered=False)
        return _generate_microbatch(arch, spec, params, chunk, on_step)

    out = lax.map(one, (jnp.arange(n // m), micro))
    return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), out)


def _generate_microbatch(arch: Architecture, spec: SamplingSpec, params: dict, batch: dict,
                         on_step=None) -> dict:
    """Text encoding, seeded noise, the denoising scan and the VAE decode for a few images.

    batch: ids (B, encoders, chunks, 77), weights (B, chunks, 77), and neg_ids/neg_weights for the negative prompt, seeds (B,)
    uint32, subseeds (B,), subseed_strength (B,), cfg_scale (B,), guidance_rescale (B,);
    optionally noise (B, h, w, c) to replace the seeded noise; init_image (B, H, W, 3) in [-1, 1]
    for img2img / inpaint; mask (B, H, W, 1) in {0, 1} (1 = repaint) and overlay (B, H, W, 1), the
    drawn image's weight in the result, for inpaint; time_ids (B, 6)
    for SDXL; with spec.controlnets (K of them), control_image_{k} (B, H, W, C) in [0, 1],
    control_scale (B, K) and control_keep (B, K, steps run), 1 where step i is on.
    Returns images (B, H, W, 3) in [-1, 1] and finite (B,) (False where latents went NaN/inf).
    """
    sampler = samplers_lib.get_sampler(spec.sampler, **dict(spec.sampler_options))
    h, w = spec.height // arch.latent_factor, spec.width // arch.latent_factor
    schedule = arch.schedule
    if arch.flow:  # Flux's shift depends on the image's token count (2x2 latent patches)
        schedule = schedule.for_image_tokens((h // 2) * (w // 2))
    plan = sampler.plan(schedule, spec.steps)
    start = spec.start_step
    latent_channels = arch.vae.latent_channels
    seeds = batch["seeds"]
    b = seeds.shape[0]
    keys = image_keys(seeds)

    if "noise" in batch:
        noise = batch["noise"].astype(jnp.float32)
    else:
        noise = initial_noise(seeds, (h, w, latent_channels), batch.get("subseeds"),
                              batch.get("subseed_strength"))

    cond = encode_text(arch, params, batch["ids"], batch["weights"], spec.clip_skip,
                       batch.get("t5_ids"), batch.get("t5_weights"))
    uncond = None
    if spec.guidance:
        uncond = encode_text(arch, params, batch["neg_ids"], batch["neg_weights"], spec.clip_skip,
                             batch.get("neg_t5_ids"), batch.get("neg_t5_weights"))
        if "neg_zero" in batch:  # SDXL: an absent negative prompt is all zeros, not the empty text
            uncond = jax.tree.map(
                lambda u: u * (1.0 - batch["neg_zero"].reshape((-1,) + (1,) * (u.ndim - 1))), uncond)
    if arch.family == "sdxl":
        cond["time_ids"] = batch["time_ids"]
        if uncond is not None:
            uncond["time_ids"] = batch["time_ids"]
    if "embedded_guidance" in batch:  # Flux-dev: per image, in both CFG halves
        cond["guidance"] = batch["embedded_guidance"]
        if uncond is not None:
            uncond["guidance"] = batch["embedded_guidance"]
    if spec.controlnets:  # per-image control inputs travel with the conditioning (both CFG halves)
        control = {"images": tuple(batch[f"control_image_{k}"] for k in range(len(spec.controlnets))),
                   "scale": batch["control_scale"], "keep": batch["control_keep"]}
        cond["control"] = control
        if uncond is not None:
            uncond["control"] = control

    # VAEs marked force_upcast (SDXL's) overflow in float16: they decode in float32.
    vae_dtype = jnp.float32 if arch.vae.force_upcast and arch.dtype == jnp.float16 else arch.dtype
    vae = AutoencoderKL(arch.vae, dtype=vae_dtype)
    x0 = mask = masked_latents = None
    if spec.mode != "txt2img":
        posterior = vae.apply({"params": params["vae"]}, batch["init_image"].astype(vae_dtype),
                              method=AutoencoderKL.encode)
        x0 = scale_latents(posterior.mode().astype(jnp.float32), arch.vae)
    if spec.mode == "inpaint":
        mask = _downsample_mask(batch["mask"], arch.latent_factor)
        if not arch.flow and arch.unet.in_channels != latent_channels:
            masked = batch["init_image"] * (1.0 - batch["mask"])
            masked_posterior = vae.apply({"params": params["vae"]}, masked.astype(vae_dtype),
                                         method=AutoencoderKL.encode)
            masked_latents = scale_latents(masked_posterior.mode().astype(jnp.float32), arch.vae)

    def unet_fn(x, t, conditioning, step=None):
        added = None
        if arch.family == "sdxl":
            added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        control = None
        if spec.controlnets:  # ControlNets see the latents alone, never an inpainting U-Net's extras
            control = control_residuals(arch, spec, params, x, t, conditioning, added, step)
        if masked_latents is not None:  # inpainting U-Net: [latents, mask, masked-image latents]
            extra = jnp.concatenate([mask, masked_latents], axis=-1)
            x = jnp.concatenate([x, jnp.concatenate([extra, extra])[:x.shape[0]]], axis=-1)
        return UNet(arch.unet, dtype=arch.dtype).apply(
            model_variables(params, "unet"), x.astype(arch.dtype), t,
            conditioning["context"].astype(arch.dtype), added, control=control).astype(jnp.float32)

    denoiser_fn = transformer_fn(arch, params) if arch.flow else unet_fn
    after_guidance = None
    if spec.slg_layers and spec.guidance:
        after_guidance = _skip_layer_guidance(arch, spec, params, cond, batch["slg_scale"])
    model_fn = classifier_free_guidance(
        denoiser_fn, cond, uncond, batch["cfg_scale"], rescale=batch["guidance_rescale"],
        interval=spec.guidance_interval, num_train_timesteps=arch.schedule.num_train_timesteps,
        after=after_guidance)

    after_step = None
    if spec.mode == "inpaint" and masked_latents is None:
        # An ordinary U-Net repaints only under the mask: elsewhere the latent is the init image
        # noised to the current level (the blending of the first inpainting pipelines).
        def after_step(state, i):
            known = _at_level(sampler, plan, x0, noise, i + 1)
            state = dict(state)
            state["x"] = mask * state["x"] + (1.0 - mask) * known
            return state

    # Inpainting at full strength starts from pure noise, as diffusers' inpainting pipelines do
    # (what the 9-channel models were trained for); img2img always starts from the noised image.
    start_x0 = None if spec.mode == "inpaint" and spec.strength == 1.0 else x0
    latents = samplers_lib.sample(
        sampler, model_fn, noise, plan, jax.vmap(lambda k: jax.random.fold_in(k, _SAMPLER_STREAM))(keys),
        x0=start_x0, start=start, after_step=after_step, on_step=on_step,
        model_takes_step=bool(spec.controlnets) or after_guidance is not None)
    finite = jnp.all(jnp.isfinite(latents), axis=(1, 2, 3))
    images = vae.apply({"params": params["vae"]}, unscale_latents(latents, arch.vae).astype(vae_dtype),
                       method=AutoencoderKL.decode).astype(jnp.float32)
    images = jnp.clip(images, -1.0, 1.0)
    if spec.mode == "inpaint":  # the init image outside the (blurred) mask: see Request.mask_blur
        images = batch["overlay"] * images + (1.0 - batch["overlay"]) * batch["init_image"]
    return {"images": images, "finite": finite}


def transformer_fn(arch: Architecture, params: dict):
    """`transformer_velocity` as the guidance wrapper calls a denoiser:
    `fn(x, t, conditioning, skip_layers=(), step=None) -> velocity`."""
    def fn(x, t, conditioning, skip_layers=(), step=None):
        del step  # scheduled inputs are the guidance's business here
        return transformer_velocity(arch, params, x, t, conditioning, skip_layers=skip_layers)
    return fn


def _skip_layer_guidance(arch, spec, params, cond, scale):
    """diffusers' SD3 skip-layer guidance as an `after` hook of classifier-free guidance: inside the
    step window, add scale * (cond - cond with spec.slg_layers skipped); outside, nothing (and the
    extra transformer call is not made: the window is the same for every image)."""
    window = np.array([spec.steps * spec.slg_start < i < spec.steps * spec.slg_stop
                       for i in range(spec.steps)])
    model = transformer_fn(arch, params)

    def after(guided, pred_cond, x, t, step):
        def with_skip():
            skipped = model(x, t, cond, skip_layers=spec.slg_layers)
            return skip_layer_term(guided, pred_cond, skipped, scale)
        return lax.cond(jnp.asarray(window)[step], with_skip, lambda: guided)

    return after


def control_residuals(arch: Architecture, spec: SamplingSpec, params: dict, x, t, conditioning,
                      added, step):
    """The summed residuals of spec.controlnets for one U-Net call (x: the latents it sees, both
    CFG halves when guidance runs), each ControlNet scaled per image by its scale times whether
    this step lies inside its start/end (conditioning["control"]["keep"], built on the host)."""
    data = conditioning["control"]
    scale = data["scale"] * jnp.take(data["keep"], step - spec.start_step, axis=2)  # (n, K)
    cond_only = spec.guess_mode and spec.guidance
    if cond_only:  # guess mode: the ControlNets see the conditional half; the other gets nothing
        half = x.shape[0] // 2
        x, t = x[half:], (t[half:] if jnp.ndim(t) else t)
        conditioning = jax.tree.map(lambda a: a[half:], conditioning)
        added = None if added is None else jax.tree.map(lambda a: a[half:], added)
        scale, data = scale[half:], conditioning["control"]
    context = conditioning["context"].astype(arch.dtype)
    down = mid = None
    for k, config in enumerate(spec.controlnets):
        residuals, residual_mid = ControlNet(config, dtype=arch.dtype).apply(
            {"params": params["controlnets"][k]}, x.astype(arch.dtype), t, context,
            data["images"][k].astype(arch.dtype), scale[:, k], added, guess_mode=spec.guess_mode)
        if down is None:
            down, mid = list(residuals), residual_mid
        else:  # several ControlNets add up, in order (diffusers' MultiControlNetModel)
            down = [a + b for a, b in zip(down, residuals)]
            mid = mid + residual_mid
    if cond_only:
        down = [jnp.concatenate([jnp.zeros_like(r), r]) for r in down]
        mid = jnp.concatenate([jnp.zeros_like(mid), mid])
    return tuple(down), mid


def _at_level(sampler, plan, x0, noise, level):
    """x0 noised to plan level `level` (traced); level n, the end of sampling, is x0 itself."""
    last = plan.num_steps
    noised = sampler.add_noise(plan, x0, noise, jnp.minimum(level, last))
    return jnp.where(level >= last, x0, noised)


def _downsample_mask(mask: jax.Array, factor: int) -> jax.Array:
    """(B, H, W, 1) pixel mask -> latent resolution: a latent is repainted if any of its pixels is."""
    b, h, w, c = mask.shape
    return mask.reshape(b, h // factor, factor, w // factor, factor, c).max(axis=(2, 4))


