"""From a generation config (configs/common.py) to PNG files: what `experiments/generate.py` runs."""
from __future__ import annotations

import math
import os
import re
import time

import numpy as np
from absl import logging

from sdjax import DEFAULT_MODEL
from sdjax import images as images_lib
from sdjax import runs
from sdjax.diffusion import samplers as samplers_lib
from sdjax.sampling import loras as loras_lib
from sdjax.sampling.exported import enable_compilation_cache
from sdjax.sampling.generator import Generator
from sdjax.sampling.requests import Request, image_seeds
from sdjax.sampling.spec import SamplingSpec

DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def spec_from_config(config) -> SamplingSpec:
    mode = "txt2img"
    if config.init_image:
        mode = "inpaint" if config.mask else "img2img"
    elif config.mask:
        raise ValueError("--mask needs --init_image (the image to inpaint)")
    interval = tuple(config.guidance_interval)
    # `--config.sampler=dpmpp_2m:karras=true` and `--config.sampler_options.karras=true` both work.
    name, inline = samplers_lib.parse_sampler(config.sampler)
    options = samplers_lib.options_for(name, {**config.sampler_options.to_dict(), **dict(inline)})
    return SamplingSpec(
        sampler=name, steps=int(config.steps), height=int(config.height),
        width=int(config.width), sampler_options=options,
        mode=mode, strength=float(config.strength) if mode != "txt2img" else 1.0,
        guidance=float(config.cfg_scale) != 1.0,
        guidance_interval=None if interval == (0.0, 1.0) else interval,
        clip_skip=int(config.clip_skip), progress=bool(config.progress))


def request_from_config(config, spec: SamplingSpec, num_images: int, seed: int) -> Request:
    init_image = mask = None
    if spec.mode != "txt2img":
        init_image = images_lib.load_image(config.init_image, (spec.height, spec.width),
                                           what="init image")
    if spec.mode == "inpaint":
        mask = images_lib.load_mask(config.mask, (spec.height, spec.width))
    return Request(prompt=config.prompt, negative_prompt=config.negative_prompt or None,
                   seed=seed, num_images=num_images, cfg_scale=float(config.cfg_scale),
                   guidance_rescale=float(config.guidance_rescale),
                   subseed=None if config.subseed < 0 else int(config.subseed),
                   subseed_strength=float(config.subseed_strength),
                   init_image=init_image, mask=mask, inpaint_overlay=bool(config.inpaint_overlay),
                   mask_blur=float(config.mask_blur), adapters=config_loras(config))


def config_loras(config) -> tuple:
    """config.loras ("NAME_OR_PATH[:UNET_WEIGHT[:TE_WEIGHT]]" each) as `Request.adapters`."""
    return tuple(loras_lib.parse_lora(text) for text in config.loras)


def check_lora_settings(config) -> None:
    """config.lora_mode and config.loras readable, before any model is loaded."""
    if config.lora_mode not in loras_lib.LORA_MODES:
        raise ValueError(f"lora_mode {config.lora_mode!r} is not one of "
                         f"{', '.join(loras_lib.LORA_MODES)}")
    config_loras(config)


# Flags every entry point that draws (generate, sample, ablate) has for its config's LoRA fields.
LORA_SHORTCUTS = {"lora": "loras", "lora_dir": "lora_dir", "lora_mode": "lora_mode",
                  "embeddings_dir": "embeddings_dir"}


def define_lora_flags() -> None:
    """absl flags for `LORA_SHORTCUTS` (apply them with `cli.apply_shortcuts`)."""
    from absl import flags

    flags.DEFINE_multi_string("lora", None, "LoRA applied to every image, NAME_OR_PATH[:UNET_WEIGHT"
                              "[:TE_WEIGHT]] (repeatable; a name is a file of --lora_dir)")
    flags.DEFINE_string("lora_dir", None, "folder whose files (any depth) LoRA names and "
                        "<lora:NAME:WEIGHT> prompt tags refer to, by file name without suffix")
    flags.DEFINE_enum("lora_mode", None, loras_lib.LORA_MODES, "apply LoRAs at run time (weights "
                      "are data: no recompiling) or merged into the model's kernels")
    flags.DEFINE_string("embeddings_dir", None, "folder of textual-inversion embeddings, each "
                        "usable in prompts by its file name")


def make_generator(config, model) -> Generator:
    """The Generator a generation config (or an ablation config) asks for."""
    check_lora_settings(config)
    return Generator(model, dtype=None if config.dtype == "float32" else DTYPES[config.dtype],
                     parallel_mode=config.parallel, fsdp=int(config.fsdp),
                     adapter_mode=config.lora_mode, lora_dir=config.lora_dir or None)


RANDOM_PREFIX = "random:"


def load_model(config):
    """The config's checkpoint; `random:PRESET` (e.g. random:tiny) builds a random-weight model of
    a preset architecture, which runs the whole pipeline without any file; "" is the embedded
    shapes-world model (DEFAULT_MODEL). With config.embeddings_dir, its textual-inversion
    embeddings are added to the model's vocabulary."""
    from sdjax.weights.presets import random_pretrained
    from sdjax.weights.pretrained import load_pretrained

    if config.model.startswith(RANDOM_PREFIX):
        model = random_pretrained(config.model[len(RANDOM_PREFIX):])
    else:
        model = load_pretrained(config.model or DEFAULT_MODEL, vae=config.vae or None,
                                prediction_type=config.prediction_type or None)
    if config.embeddings_dir:
        from sdjax.adapters.embeddings import with_embeddings

        model = with_embeddings(model, [os.path.expanduser(config.embeddings_dir)])
    return model


def generation_parameters(config, spec: SamplingSpec, seed: int, model_name: str,
                          adapters=(), lora_mode: str = "runtime") -> dict:
    """The PNG `parameters` settings of one image (`adapters`: the `Weighted` LoRAs it was drawn
    with, as `Generator.adapters_for` gives them)."""
    settings = {"Steps": spec.steps, "Sampler": spec.sampler, "CFG scale": config.cfg_scale,
                "Seed": seed, "Size": f"{spec.width}x{spec.height}", "Model": model_name}
    if config.guidance_rescale:
        settings["Guidance rescale"] = config.guidance_rescale
    if spec.sampler_options:
        settings["Sampler options"] = " ".join(f"{k}={v}" for k, v in spec.sampler_options)
    if spec.clip_skip:
        settings["Clip skip"] = spec.clip_skip
    if config.subseed >= 0 and config.subseed_strength > 0:
        settings["Variation seed"] = config.subseed + (seed - config.seed)
        settings["Variation seed strength"] = config.subseed_strength
    if spec.mode != "txt2img":
        settings["Denoising strength"] = spec.strength
    if spec.mode == "inpaint" and config.inpaint_overlay:
        settings["Mask blur"] = config.mask_blur
    settings.update(loras_lib.parameters(adapters, lora_mode))
    return settings


def generate_to_dir(config, model=None) -> list[str]:
    """Generate `config.num_images` images in batches and write them (one PNG each, with the WebUI
    `parameters` chunk), a grid, and the resolved config. Returns the image paths."""
    total, batch = check_counts(config)
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise ValueError(f"out_dir {config.out_dir!r} is a file, not a folder")
    enable_compilation_cache(config.compilation_cache)
    spec = spec_from_config(config)
    model = model or load_model(config)
    generator = make_generator(config, model)
    # The first request checked whole (prompt syntax, LoRAs, images, mask, sizes) before anything
    # is written. Every request of the run applies the same LoRAs.
    first_request = request_from_config(config, spec, min(batch, total), int(config.seed))
    generator.prepare(first_request, spec)
    adapters = generator.adapters_for(first_request)
    os.makedirs(config.out_dir, exist_ok=True)
    # Earlier runs into the same folder are kept: numbering continues after theirs (the WebUI's
    # habit), and this run's config gets its own name when config.json holds another's.
    start = next_image_index(config.out_dir)
    runs.write_atomically(_unused_path(config.out_dir, "config", ".json", start),
                          config.to_json(indent=2))
    model_name = os.path.basename(os.path.normpath(model.source)) or "model"
    paths, images = [], []
    for first in range(0, total, batch):
        n = min(batch, total - first)
        request = request_from_config(config, spec, n, int(config.seed) + first)
        started = time.perf_counter()
        out = generator(request, spec)
        logging.info("generated %d image(s) in %.2f s", n, time.perf_counter() - started)
        for i, (image, seed) in enumerate(zip(images_lib.to_uint8(out["images"]), out["seeds"])):
            path = os.path.join(config.out_dir, f"{start + first + i:05d}-{int(seed)}.png")
            text = images_lib.format_parameters(
                config.prompt, config.negative_prompt,
                generation_parameters(config, spec, int(seed), model_name, adapters,
                                      generator.adapter_mode))
            images_lib.save_png(image, path, text)
            paths.append(path)
            images.append(image)
    if len(images) > 1:
        images_lib.save_png(images_lib.grid(images),
                            _unused_path(config.out_dir, "grid", ".png", start))
    return paths


def check_counts(config) -> tuple[int, int]:
    """(num_images, images per call) after checking the config's counts, seeds and dtype, before
    any model is loaded or program compiled."""
    total, batch = config.num_images, config.batch_size
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {total!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch_size must be an integer >= 0 (0: all images in one call), "
                         f"got {batch!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype {config.dtype!r} is not one of {', '.join(DTYPES)}")
    check_lora_settings(config)
    image_seeds(config.seed, total)
    if config.subseed >= 0:
        image_seeds(config.subseed, total, "subseed")
    if not math.isfinite(float(config.cfg_scale)):
        raise ValueError(f"cfg_scale must be finite, got {config.cfg_scale!r}")
    return total, batch or total


def _unused_path(out_dir: str, stem: str, suffix: str, start: int) -> str:
    """`stem.suffix`, or `stem-<start>.suffix` (then `-1`, `-2`, ...) when a file of that name is
    already there: another run's, or another tool's, is never overwritten."""
    names = [f"{stem}{suffix}", f"{stem}-{start:05d}{suffix}"]
    names += (f"{stem}-{start:05d}-{i}{suffix}" for i in range(1, 1000))
    return next(path for path in (os.path.join(out_dir, n) for n in names)
                if not os.path.exists(path))


def next_image_index(out_dir: str) -> int:
    """One past the highest `NNNNN-` image number already in `out_dir` (0 for a new folder)."""
    numbers = [int(m.group(1)) for name in os.listdir(out_dir)
               if (m := re.match(r"(\d{5,})-.*\.png$", name))]
    return max(numbers) + 1 if numbers else 0
