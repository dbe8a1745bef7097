"""Prompt in, image out: text encoding, seeded noise, the denoising scan and the VAE decode, as one
compiled program per (model, shapes, sampler, step count), run data-parallel over a device mesh.

Seeds: image i of a request with seed s uses seed s + i; its initial noise, its sampler noise and
its VAE sample are all derived from `jax.random.key(s + i)`, never from a key split across the
batch, so an image is the same whatever the batch size, device count or parallel mode.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from sdjax import exported as exported_lib
from sdjax import parallel, prompts
from sdjax.diffusion import samplers as samplers_lib
from sdjax.diffusion.guidance import classifier_free_guidance
from sdjax.diffusion.schedules import NoiseSchedule
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, text_hidden_state
from sdjax.models.unet import UNet, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig, scale_latents, unscale_latents

MODES = ("txt2img", "img2img", "inpaint")
# Streams of randomness derived from one image's key (fold_in), kept apart so that, e.g., turning on
# a stochastic sampler never changes the initial noise.
_NOISE_STREAM, _SAMPLER_STREAM, _VAE_STREAM = 0, 1, 2
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sdjax", "xla")
# The sdjax sources the sampling program is traced from (relative to the package): an exported
# program is keyed by their digest, so editing them rebuilds it. tests/test_exported_programs.py
# checks that importing this module imports nothing of sdjax outside them.
PROGRAM_SOURCES = ("__init__.py", "sampling.py", "exported.py", "parallel.py", "prompts.py",
                   "models", "diffusion")


class NonFiniteLatentsError(RuntimeError):
    """Sampling produced NaN or infinite latents for some images; nothing was decoded into files."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The static (hashable) description of a loaded model: what a compiled program depends on."""
    family: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[CLIPTextConfig, ...]
    schedule: NoiseSchedule
    dtype: Any = jnp.float32

    @classmethod
    def of(cls, model, dtype: Any = None) -> "Architecture":
        return cls(family=model.family, unet=model.unet_config, vae=model.vae_config,
                   text_encoders=tuple(model.text_configs),
                   schedule=NoiseSchedule.from_diffusers(model.scheduler_config),
                   dtype=jnp.dtype(dtype or jnp.float32))

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """Static settings: changing one of these compiles a new program; everything else (prompts,
    seeds, guidance scales, init images) is data."""
    sampler: str = "dpmpp_2m"
    steps: int = 25
    height: int = 512
    width: int = 512
    sampler_options: tuple[tuple[str, Any], ...] = ()
    mode: str = "txt2img"
    strength: float = 1.0          # img2img / inpaint: fraction of the steps that are run
    guidance: bool = True          # False: conditional branch only (every scale is 1)
    guidance_interval: Optional[tuple[float, float]] = None
    clip_skip: int = 0
    progress: bool = False
    # Images denoised together inside one device's share of the batch. An image's numbers depend on
    # the shapes it is computed with, so a fixed micro-batch makes every image bit-identical
    # whatever the batch size, device count or parallel mode. 1 is exact everywhere; larger values
    # use an accelerator better and stay exact between runs with the same value.
    microbatch: int = 1

    def validate(self, arch: Architecture) -> None:
        samplers_lib.get_sampler(self.sampler, **dict(self.sampler_options))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.microbatch < 1:
            raise ValueError(f"microbatch must be >= 1, got {self.microbatch}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        multiple = int(np.lcm(8, arch.latent_factor))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
        if self.mode != "txt2img" and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.mode == "inpaint" and arch.unet.in_channels not in (arch.vae.latent_channels,
                                                                      2 * arch.vae.latent_channels + 1):
            raise ValueError(f"inpainting needs a U-Net with {arch.vae.latent_channels} or "
                             f"{2 * arch.vae.latent_channels + 1} input channels, this one has "
                             f"{arch.unet.in_channels}")
        if self.mode != "inpaint" and arch.unet.in_channels != arch.vae.latent_channels:
            raise ValueError(f"this U-Net takes {arch.unet.in_channels} input channels (an "
                             f"inpainting model): use mode='inpaint' with an init image and a mask")

    @property
    def start_step(self) -> int:
        if self.mode == "txt2img":
            return 0
        return samplers_lib.start_index(self.steps, self.strength)


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


# --- text ------------------------------------------------------------------------------------------

def encode_text(arch: Architecture, params: dict, ids: jax.Array, weights: jax.Array,
                clip_skip: int = 0) -> dict:
    """Token ids (B, encoders, chunks, 77) and emphasis weights (B, chunks, 77) -> the U-Net's
    conditioning.

    Returns {"context": (B, chunks*77, D)} plus, for SDXL, {"text_embeds": (B, P)} (the second
    encoder's pooled, projected output of the first chunk).
    """
    batch, _, chunks, width = ids.shape
    flat_weights = weights.reshape(batch * chunks, width)
    contexts, pooled = [], None
    sdxl = arch.family == "sdxl"
    for index, config in enumerate(arch.text_encoders):
        name = "text_encoder" if index == 0 else "text_encoder_2"
        model = CLIPTextModel(config, dtype=arch.dtype)
        output = model.apply({"params": params[name]}, ids[:, index].reshape(batch * chunks, width))
        # SDXL conditions on the penultimate layer without the final norm (diffusers' convention).
        hidden = text_hidden_state(model, params[name], output,
                                   clip_skip=clip_skip + 1 if sdxl else clip_skip,
                                   apply_final_norm=not sdxl)
        hidden = prompts.apply_emphasis(hidden, flat_weights)
        contexts.append(hidden.reshape(batch, chunks * width, -1))
        if output.text_embeds is not None and sdxl:
            pooled = output.text_embeds.reshape(batch, chunks, -1)[:, 0]
    cond = {"context": jnp.concatenate(contexts, axis=-1)}
    if sdxl:
        cond["text_embeds"] = pooled
    return cond


def sdxl_time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's micro-conditioning: original size, crop top-left, target size (no crop, same size)."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (batch, 1))


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
    for img2img / inpaint; mask (B, H, W, 1) in {0, 1} (1 = repaint) for inpaint; time_ids (B, 6)
    for SDXL.
    Returns images (B, H, W, 3) in [-1, 1] and finite (B,) (False where latents went NaN/inf).
    """
    sampler = samplers_lib.get_sampler(spec.sampler, **dict(spec.sampler_options))
    plan = sampler.plan(arch.schedule, spec.steps)
    start = spec.start_step
    h, w = spec.height // arch.latent_factor, spec.width // arch.latent_factor
    latent_channels = arch.vae.latent_channels
    seeds = batch["seeds"]
    b = seeds.shape[0]
    keys = image_keys(seeds)

    if "noise" in batch:
        noise = batch["noise"].astype(jnp.float32)
    else:
        noise = initial_noise(seeds, (h, w, latent_channels), batch.get("subseeds"),
                              batch.get("subseed_strength"))

    cond = encode_text(arch, params, batch["ids"], batch["weights"], spec.clip_skip)
    uncond = None
    if spec.guidance:
        uncond = encode_text(arch, params, batch["neg_ids"], batch["neg_weights"], spec.clip_skip)
        if "neg_zero" in batch:  # SDXL: an absent negative prompt is all zeros, not the empty text
            uncond = jax.tree.map(
                lambda u: u * (1.0 - batch["neg_zero"].reshape((-1,) + (1,) * (u.ndim - 1))), uncond)
    if arch.family == "sdxl":
        cond["time_ids"] = batch["time_ids"]
        if uncond is not None:
            uncond["time_ids"] = batch["time_ids"]

    # VAEs marked force_upcast (SDXL's) overflow in float16: they decode in float32.
    vae_dtype = jnp.float32 if arch.vae.force_upcast and arch.dtype == jnp.float16 else arch.dtype
    vae = AutoencoderKL(arch.vae, dtype=vae_dtype)
    unet = UNet(arch.unet, dtype=arch.dtype)
    x0 = mask = masked_latents = None
    if spec.mode != "txt2img":
        posterior = vae.apply({"params": params["vae"]}, batch["init_image"].astype(vae_dtype),
                              method=AutoencoderKL.encode)
        x0 = scale_latents(posterior.mode().astype(jnp.float32), arch.vae)
    if spec.mode == "inpaint":
        mask = _downsample_mask(batch["mask"], arch.latent_factor)
        if arch.unet.in_channels != latent_channels:
            masked = batch["init_image"] * (1.0 - batch["mask"])
            masked_posterior = vae.apply({"params": params["vae"]}, masked.astype(vae_dtype),
                                         method=AutoencoderKL.encode)
            masked_latents = scale_latents(masked_posterior.mode().astype(jnp.float32), arch.vae)

    def unet_fn(x, t, conditioning):
        if masked_latents is not None:  # inpainting U-Net: [latents, mask, masked-image latents]
            extra = jnp.concatenate([mask, masked_latents], axis=-1)
            x = jnp.concatenate([x, jnp.concatenate([extra, extra])[:x.shape[0]]], axis=-1)
        added = None
        if arch.family == "sdxl":
            added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return unet.apply({"params": params["unet"]}, x.astype(arch.dtype), t,
                          conditioning["context"].astype(arch.dtype), added).astype(jnp.float32)

    model_fn = classifier_free_guidance(
        unet_fn, cond, uncond, batch["cfg_scale"], rescale=batch["guidance_rescale"],
        interval=spec.guidance_interval, num_train_timesteps=arch.schedule.num_train_timesteps)

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
        x0=start_x0, start=start, after_step=after_step, on_step=on_step)
    finite = jnp.all(jnp.isfinite(latents), axis=(1, 2, 3))
    images = vae.apply({"params": params["vae"]}, unscale_latents(latents, arch.vae).astype(vae_dtype),
                       method=AutoencoderKL.decode).astype(jnp.float32)
    return {"images": jnp.clip(images, -1.0, 1.0), "finite": finite}


def _at_level(sampler, plan, x0, noise, level):
    """x0 noised to plan level `level` (traced); level n, the end of sampling, is x0 itself."""
    last = plan.num_steps
    noised = sampler.add_noise(plan, x0, noise, jnp.minimum(level, last))
    return jnp.where(level >= last, x0, noised)


def _downsample_mask(mask: jax.Array, factor: int) -> jax.Array:
    """(B, H, W, 1) pixel mask -> latent resolution: a latent is repainted if any of its pixels is."""
    b, h, w, c = mask.shape
    return mask.reshape(b, h // factor, factor, w // factor, factor, c).max(axis=(2, 4))


# --- running it ------------------------------------------------------------------------------------

def enable_compilation_cache(path: Optional[str] = DEFAULT_COMPILATION_CACHE) -> None:
    """Keep compiled programs on disk so a second launch loads instead of compiling; `Generator`
    also keeps its lowered programs there (`<path>/sdjax_exported`), so it need not trace them."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class Request:
    """What to draw. Lists are per image; a single value applies to every image."""
    prompt: str | Sequence[str]
    negative_prompt: Optional[str | Sequence[str]] = None
    seed: int = 0                      # image i gets seed + i
    num_images: int = 1
    cfg_scale: float | Sequence[float] = 7.5
    guidance_rescale: float | Sequence[float] = 0.0
    subseed: Optional[int] = None      # variation seed: image i gets subseed + i
    subseed_strength: float = 0.0
    init_image: Optional[np.ndarray] = None   # (H, W, 3) or (B, H, W, 3) in [-1, 1]
    mask: Optional[np.ndarray] = None         # (H, W) or (B, H, W) in {0, 1}, 1 = repaint
    noise: Optional[np.ndarray] = None        # (B, h, w, c): replaces the seeded noise (parity tests)


class Generator:
    """A loaded model bound to a mesh, with its compiled programs cached by static settings.

    A thin convenience: the params stay a pytree, the program is `generate_images`.

    exported_programs: with the default True, when JAX's persistent compilation cache is enabled
    (`enable_compilation_cache`), each lowered program is also kept there (`jax.export`,
    `sdjax.exported`) and a later launch loads it instead of tracing; a path keeps them in that
    folder whether or not the cache is on; False always traces. Only the jit mode without a
    progress bar is exported (see `program_for`); the others trace on every launch.
    """

    def __init__(self, model, *, dtype: Any = None, parallel_mode: str = "jit", fsdp: int = 1,
                 mesh: Optional[jax.sharding.Mesh] = None, exported_programs: bool | str = True):
        if parallel_mode not in parallel.PARALLEL_MODES:
            raise ValueError(f"parallel mode {parallel_mode!r} is not one of "
                             f"{', '.join(parallel.PARALLEL_MODES)}")
        self.model = model
        self.arch = Architecture.of(model, dtype)
        self.parallel_mode = parallel_mode
        self.mesh = mesh or parallel.make_mesh(fsdp=fsdp)
        params = model.params
        if dtype is not None:
            params = jax.tree.map(lambda x: np.asarray(x, dtype=dtype), params)
        if parallel_mode == "jit":
            self.params = jax.device_put(params, parallel.param_sharding(self.mesh, params))
        else:
            self.params = params
        self.exported_programs = exported_programs
        self._programs: dict = {}
        self._exported: dict = {}
        self.traces = 0  # how many times a program was traced (compiles), for tests and logs
        # One entry per exported program looked up: key, outcome (hit / miss / rebuilt /
        # unsupported) and the seconds of each stage.
        self.program_log: list[dict] = []

    @property
    def num_devices(self) -> int:
        return self.mesh.size if self.parallel_mode == "jit" else jax.local_device_count()

    def _program(self, spec: SamplingSpec, structure):
        key = (spec, structure)
        if key not in self._programs:
            def counted(params, batch):
                self.traces += 1
                return generate_images(self.arch, spec, params, batch)

            if self.parallel_mode == "jit":
                self._programs[key] = parallel.jit_over_batch(
                    counted, self.mesh, parallel.param_sharding(self.mesh, self.params))
            else:
                self._programs[key] = parallel.pmap_over_batch(counted)
        return self._programs[key]

    def program_for(self, spec: SamplingSpec, batch: dict):
        """The program to run on `batch` (padded to the device count; placed by
        `parallel.shard_batch` in jit mode): the compiled exported program where one is kept on
        disk (loaded, or traced and written now), else the traced program."""
        store = self._exported_store()
        # jax.export serializes jit programs only, and no host callbacks: pmap and the progress
        # bar (a jax.debug.callback in the scan) trace on every launch. Multi-process runs too:
        # untested with exported programs.
        if (store is None or self.parallel_mode != "jit" or spec.progress
                or jax.process_count() > 1):
            return self._program(spec, tuple(sorted(batch)))
        signature = tuple((k, np.shape(v), str(np.dtype(v.dtype))) for k, v in sorted(batch.items()))
        key = (spec, signature)
        if key not in self._exported:
            self._exported[key] = (self._exported_program(store, spec, batch)
                                   or self._program(spec, tuple(sorted(batch))))
        return self._exported[key]

    def _exported_store(self) -> Optional[exported_lib.ExportedStore]:
        if self.exported_programs is False:
            return None
        if isinstance(self.exported_programs, (str, os.PathLike)):
            return exported_lib.ExportedStore(os.fspath(self.exported_programs))
        directory = exported_lib.default_directory()
        return exported_lib.ExportedStore(directory) if directory else None

    def program_description(self, spec: SamplingSpec, batch: dict) -> dict:
        """Everything an exported program depends on, JSON-able; its digest is the entry's key."""
        return {
            "program": "sdjax.sampling.generate_images", "parallel_mode": self.parallel_mode,
            "architecture": exported_lib.canonical(self.arch),
            "spec": exported_lib.canonical(spec),
            "batch": exported_lib.arrays_signature(batch),
            "params": exported_lib.tree_signature(self.params),
            "environment": exported_lib.environment(self.mesh, PROGRAM_SOURCES),
        }

    def _exported_program(self, store: exported_lib.ExportedStore, spec: SamplingSpec, batch: dict):
        """Load the lowered program from `store`, or export and write it; either way compile it
        (XLA's own persistent cache serves that). None where it cannot be exported."""
        description = self.program_description(spec, batch)
        key = exported_lib.key_of(description)
        args = (self.params, batch)
        entry = {"key": key, "directory": store.directory, "outcome": None, "seconds": {}}
        self.program_log.append(entry)
        start = time.perf_counter()
        exported, status = store.load(key, args)
        entry["seconds"]["load"] = time.perf_counter() - start
        if exported is not None:
            try:
                compiled = self._compile_exported(exported, args, entry["seconds"])
                entry["outcome"] = "hit"
                logging.info("sampling program %s loaded from %s", key, store.directory)
                return compiled
            except Exception as error:  # noqa: BLE001 - a bad entry is rebuilt, never fatal
                logging.warning("exported program %s in %s does not compile (%s: %s); tracing "
                                "it again", key, store.directory, type(error).__name__, error)
                store.remove(key)
                status = "corrupt"
        start = time.perf_counter()
        try:
            exported = jax.export.export(self._program(spec, tuple(sorted(batch))))(*args)
        except Exception as error:  # noqa: BLE001 - the traced path runs it (or raises) instead
            entry["outcome"] = "unsupported"
            logging.warning("cannot export the sampling program (%s: %s); it is traced on every "
                            "launch", type(error).__name__, error)
            return None
        entry["seconds"]["export"] = time.perf_counter() - start
        store.save(key, description, exported, entry["seconds"]["export"])
        entry["outcome"] = "miss" if status == "miss" else "rebuilt"
        logging.info("sampling program %s traced and written to %s", key, store.directory)
        return self._compile_exported(exported, args, entry["seconds"])

    def _compile_exported(self, exported, args: tuple, seconds: dict):
        # Same shardings as the traced program: the call runs on the same placed arrays.
        data = parallel.batch_sharding(self.mesh)
        runner = jax.jit(exported.call, in_shardings=(
            parallel.param_sharding(self.mesh, self.params), data), out_shardings=data)
        start = time.perf_counter()
        lowered = runner.lower(*args)
        seconds["lower"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        seconds["compile"] = time.perf_counter() - start
        return compiled

    def prepare(self, request: Request, spec: SamplingSpec) -> dict:
        """Host-side: tokenize and lay out the batch arrays for `request`."""
        spec.validate(self.arch)
        n = request.num_images
        if n < 1:
            raise ValueError(f"num_images must be >= 1, got {n}")
        prompts_list = _per_image(request.prompt, n, "prompt")
        negative_given = request.negative_prompt is not None
        negatives = _per_image(request.negative_prompt or "", n, "negative_prompt")
        # One id tensor per text encoder: their tokenizers differ in padding (SDXL's second pads
        # with "!"), the emphasis weights do not.
        per_encoder = [prompts.tokenize_batch(t, prompts_list + negatives) for t in self.model.tokenizers]
        chunks = max(ids.shape[1] for ids, _ in per_encoder)
        per_encoder = [prompts.tokenize_batch(t, prompts_list + negatives, min_chunks=chunks)
                       for t in self.model.tokenizers]
        ids = np.stack([i for i, _ in per_encoder], axis=1)
        weights = per_encoder[0][1]
        seeds = (np.uint64(request.seed) + np.arange(n, dtype=np.uint64)).astype(np.uint32)
        batch = {
            "ids": ids[:n], "weights": weights[:n], "neg_ids": ids[n:], "neg_weights": weights[n:],
            "seeds": seeds,
            "cfg_scale": np.asarray(_per_image(request.cfg_scale, n, "cfg_scale"), np.float32),
            "guidance_rescale": np.asarray(_per_image(request.guidance_rescale, n, "guidance_rescale"),
                                           np.float32),
        }
        if request.subseed is not None and request.subseed_strength > 0:
            batch["subseeds"] = (np.uint64(request.subseed) + np.arange(n, dtype=np.uint64)).astype(np.uint32)
            batch["subseed_strength"] = np.full((n,), request.subseed_strength, np.float32)
        if self.arch.family == "sdxl":
            batch["time_ids"] = sdxl_time_ids(spec.height, spec.width, n)
            if not negative_given:
                batch["neg_zero"] = np.ones((n,), np.float32)
        if request.noise is not None:
            batch["noise"] = np.asarray(request.noise, np.float32)
        if spec.mode != "txt2img":
            if request.init_image is None:
                raise ValueError(f"mode {spec.mode!r} needs an init image")
            init = np.asarray(request.init_image, np.float32)
            init = np.broadcast_to(init, (n,) + init.shape[-3:]) if init.ndim == 3 else init
            if init.shape[1:3] != (spec.height, spec.width):
                raise ValueError(f"init image is {init.shape[2]}x{init.shape[1]} but the request is "
                                 f"{spec.width}x{spec.height} (width x height)")
            batch["init_image"] = init
        if spec.mode == "inpaint":
            if request.mask is None:
                raise ValueError("mode 'inpaint' needs a mask")
            mask = np.asarray(request.mask, np.float32)
            mask = np.broadcast_to(mask, (n,) + mask.shape[-2:]) if mask.ndim == 2 else mask
            if mask.shape[1:] != (spec.height, spec.width):
                raise ValueError(f"mask is {mask.shape[2]}x{mask.shape[1]} but the image is "
                                 f"{spec.width}x{spec.height} (width x height)")
            batch["mask"] = mask[..., None]
        return batch

    def __call__(self, request: Request, spec: SamplingSpec, *, check_finite: bool = True) -> dict:
        """Run a request: returns {"images": float32 (B, H, W, 3) in [-1, 1], "finite": (B,), "seeds"}.

        The batch is padded up to a multiple of the device count (extra seeds, discarded); padding
        never changes the real images, since each image depends only on its own seed.
        """
        batch = self.prepare(request, spec)
        n = request.num_images
        padded = -(-n // self.num_devices) * self.num_devices
        if padded != n:
            batch = {k: _pad_rows(v, padded) if k != "seeds" else
                     (np.uint64(request.seed) + np.arange(padded, dtype=np.uint64)).astype(np.uint32)
                     for k, v in batch.items()}
        if self.parallel_mode == "jit":
            batch = parallel.shard_batch(batch, self.mesh)
        out = self.program_for(spec, batch)(self.params, batch)
        out = jax.tree.map(lambda x: np.asarray(x)[:n], out)
        out["seeds"] = (np.uint64(request.seed) + np.arange(n, dtype=np.uint64)).astype(np.uint32)
        if check_finite and not out["finite"].all():
            bad = [int(s) for s, ok in zip(out["seeds"], out["finite"]) if not ok]
            raise NonFiniteLatentsError(
                f"sampling produced NaN/inf latents for seed(s) {bad}; lower the guidance scale, "
                f"use float32, or check the checkpoint")
        return out


def _per_image(value, n: int, name: str) -> list:
    if isinstance(value, (str, int, float, np.floating, np.integer)):
        return [value] * n
    values = list(value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but num_images is {n}")
    return values


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])
