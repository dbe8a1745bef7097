"""From a generation config (configs/common.py) to PNG files: what `experiments/generate.py` runs."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from sdjax import DEFAULT_MODEL
from sdjax import images as images_lib
from sdjax import preprocessors
from sdjax import runs
from sdjax.diffusion import samplers as samplers_lib
from sdjax.sampling import loras as loras_lib
from sdjax.sampling.controls import Control, ControlNetLibrary
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
        clip_skip=int(config.clip_skip), progress=bool(config.progress),
        guess_mode=bool(config.get("control_guess_mode", False)),
        max_sequence_length=int(config.get("max_sequence_length", 0)),
        slg_layers=tuple(int(k) for k in config.get("slg_layers", ())),
        slg_start=float(config.get("slg_start", SamplingSpec.slg_start)),
        slg_stop=float(config.get("slg_stop", SamplingSpec.slg_stop)))


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
                   mask_blur=float(config.mask_blur), adapters=config_loras(config),
                   controls=config_controls(config),
                   embedded_guidance=float(config.get("embedded_guidance", 3.5)),
                   slg_scale=float(config.get("slg_scale", 2.8)))


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


# --- ControlNets -----------------------------------------------------------------------------------

# The settings of the ControlNets applied to an image, named alike as config fields, flags and
# prompt-file fields: one value per ControlNet, in order (start, end and preprocess: or one for all).
CONTROL_FIELDS = ("controlnet", "control_image", "control_scale", "control_start", "control_end",
                  "control_preprocess")
# Flags every entry point that draws with ControlNets (generate, sample, ablate) has for its config's fields.
CONTROL_SHORTCUTS = CONTROL_FIELDS + ("control_guess_mode", "controlnet_dir")
_ONE_FOR_ALL = ("control_start", "control_end", "control_preprocess")
_DEFAULTS = {"control_scale": Control.scale, "control_start": Control.start,
             "control_end": Control.end, "control_preprocess": Control.preprocess}


def define_control_flags() -> None:
    """absl flags for `CONTROL_SHORTCUTS` (apply them with `cli.apply_shortcuts`)."""
    from absl import flags

    flags.DEFINE_multi_string("controlnet", None, "ControlNet applied to every image: a diffusers "
                              "folder or .safetensors file, or a name of --controlnet_dir "
                              "(repeatable: several add up)")
    flags.DEFINE_multi_string("control_image", None, "control image of each --controlnet, in order")
    flags.DEFINE_multi_float("control_scale", None, "conditioning scale of each --controlnet, in "
                             "order (default 1)")
    flags.DEFINE_multi_float("control_start", None, "fraction of the steps at which each "
                             "--controlnet starts acting (one per ControlNet, or one for all; "
                             "default 0)")
    flags.DEFINE_multi_float("control_end", None, "fraction of the steps at which each "
                             "--controlnet stops acting (one per ControlNet, or one for all; "
                             "default 1)")
    flags.DEFINE_multi_enum("control_preprocess", None, preprocessors.PREPROCESSORS,
                            "what each --control_image goes through first (one per ControlNet, or "
                            "one for all; default none; canny needs sdjax[control])")
    flags.DEFINE_boolean("control_guess_mode", None, "ControlNets act on the conditional half of "
                         "guidance only (diffusers' guess_mode, the WebUI's 'ControlNet is more "
                         "important')")
    flags.DEFINE_string("controlnet_dir", None, "folder whose ControlNets (folders or "
                        ".safetensors) --controlnet names refer to")


def controls_from(settings: Mapping[str, Any], *, directory: str = "",
                  named: Callable[[str], str] = lambda field: f"--{field}") -> tuple[Control, ...]:
    """The `Control`s that `settings` (`CONTROL_FIELDS` -> a value or a list of them) ask for,
    checked without loading anything: counts, finite scales, 0 <= start < end <= 1, known
    preprocessors (and OpenCV for canny), every control image a file and every ControlNet found
    (a name in `directory`; `Control.controlnet` is the resolved path). Errors name the settings
    as `named(field)` does."""
    values = {field: _listed(settings.get(field), field, named) for field in CONTROL_FIELDS}
    count = len(values["controlnet"])
    for field in CONTROL_FIELDS[1:]:
        given = values[field]
        if not given and field in _DEFAULTS:
            values[field] = [_DEFAULTS[field]] * count
        elif len(given) == 1 and field in _ONE_FOR_ALL:
            values[field] = given * count
        elif len(given) != count:
            also = ", or one for all" if field in _ONE_FOR_ALL else ""
            raise ValueError(f"{named(field)}: {len(given)} value(s) for {count} ControlNet(s) "
                             f"({named('controlnet')}); give one per ControlNet, in the same "
                             f"order{also}")
    library = ControlNetLibrary(None, directory=directory or None)
    controls = []
    for k in range(count):
        net, image, scale, start, end, preprocess = (values[field][k] for field in CONTROL_FIELDS)
        if not net.strip():
            raise ValueError(f"{named('controlnet')}: an empty name (ControlNet {k})")
        if not math.isfinite(scale):
            raise ValueError(f"{named('control_scale')} must be finite, got {scale}")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"{named('control_start')} {start} and {named('control_end')} {end} "
                             f"(ControlNet {k}) must satisfy 0 <= start < end <= 1 (fractions of "
                             f"the steps)")
        preprocessors.check_preprocess(preprocess, named("control_preprocess"))
        if not os.path.isfile(image):
            raise ValueError(f"{named('control_image')}: {image}: no such file")
        controls.append(Control(str(library.resolve(net)), image, scale=float(scale),
                                start=float(start), end=float(end), preprocess=preprocess))
    return tuple(controls)


_KINDS = {"controlnet": str, "control_image": str, "control_preprocess": str,
          "control_scale": (int, float), "control_start": (int, float), "control_end": (int, float)}


def _listed(value: Any, field: str, named: Callable[[str], str]) -> list:
    """A setting's values: one value or a list (tuple) of them; None is none."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    kind = _KINDS[field]
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
        expected = "a string" if kind is str else "a number"
        raise ValueError(f"{named(field)} must be {expected} or a list of them, got {value!r}")
    return values


def config_controls(config) -> tuple[Control, ...]:
    """The config's ControlNets (`CONTROL_FIELDS`) as `Request.controls`."""
    return controls_from({field: config.get(field) for field in CONTROL_FIELDS},
                         directory=config.get("controlnet_dir", ""))


def check_control_settings(config) -> None:
    """The config's ControlNet settings readable, before any model is loaded."""
    if not config_controls(config) and config.get("control_guess_mode", False):
        raise ValueError("--control_guess_mode needs a --controlnet")


def control_parameters(controls: Sequence[Control], guess_mode: bool) -> dict:
    """PNG `parameters` settings for the ControlNets a picture was drawn with (each `Control`'s
    controlnet a path, its scale one value), as the WebUI's ControlNet extension writes them:
    `ControlNet 0: "Module: canny, Model: NAME [HASH], Weight: 0.8, ..."`, NAME the file's stem or
    the folder's name and HASH the WebUI's short hash of the weights file (absent for sharded
    weights). Guess mode is recorded as "ControlNet is more important", the control mode the
    extension's guess mode became in ControlNet 1.1."""
    settings = {}
    for k, control in enumerate(controls):
        path = os.fspath(control.controlnet)
        # The extension's parser splits units at ',' and ': ', so names must hold neither.
        name = controlnet_name(path).replace(":", "").replace(",", "")
        digest = webui_model_hash(path)
        unit = {"Module": control.preprocess, "Model": f"{name} [{digest}]" if digest else name,
                "Weight": float(control.scale), "Resize Mode": "Just Resize"}
        if control.preprocess == "canny":
            unit["Threshold A"], unit["Threshold B"] = preprocessors.CANNY_THRESHOLDS
        unit.update({"Guidance Start": float(control.start), "Guidance End": float(control.end),
                     "Control Mode": "ControlNet is more important" if guess_mode else "Balanced"})
        # Quoted as the WebUI quotes a value holding ',' or ':' (JSON).
        settings[f"ControlNet {k}"] = json.dumps(", ".join(f"{key}: {value}"
                                                           for key, value in unit.items()),
                                                 ensure_ascii=False)
    return settings


def controlnet_name(path: str) -> str:
    """A ControlNet's name: its file's stem or its folder's name."""
    base = os.path.basename(os.path.normpath(path))
    return os.path.splitext(base)[0] if os.path.isfile(path) else base


def controlnet_files(path: str | os.PathLike) -> list[str]:
    """The files a ControlNet is read from: the file itself, or a diffusers folder's config and
    weights (in its `controlnet/` subfolder for a pipeline folder)."""
    from sdjax.weights.controlnet import CONFIG_NAME, SUBFOLDER

    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    folder = path
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isdir(
            os.path.join(path, SUBFOLDER)):
        folder = os.path.join(path, SUBFOLDER)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name == CONFIG_NAME or name.startswith("diffusion_pytorch_model"))


def webui_model_hash(path: str | os.PathLike) -> Optional[str]:
    """The WebUI's short model hash (`sd_models.model_hash`, which its ControlNet extension shows
    as "name [hash]"): the first 8 hex digits of the sha256 of 64 KiB at 1 MiB into the weights
    file; None where the weights are several files."""
    weights = [f for f in controlnet_files(path) if f.endswith(".safetensors")]
    if len(weights) != 1:
        return None
    with open(weights[0], "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def contents_hash(paths: Sequence[str | os.PathLike]) -> str:
    """12 hex digits of a sha256 over the files' contents (each file read once per process while
    it keeps its size and modification time): what tells a changed control image or ControlNet."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(runs.file_sha256(path).encode())
    return digest.hexdigest()[:12]


def make_generator(config, model) -> Generator:
    """The Generator a generation config (or an ablation config) asks for."""
    check_lora_settings(config)
    return Generator(model, dtype=None if config.dtype == "float32" else DTYPES[config.dtype],
                     parallel_mode=config.parallel, fsdp=int(config.fsdp),
                     adapter_mode=config.lora_mode, lora_dir=config.lora_dir or None,
                     controlnet_dir=config.get("controlnet_dir") or None)


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
                                prediction_type=config.prediction_type or None,
                                components=config.get("components") or None)
    if config.embeddings_dir:
        from sdjax.adapters.embeddings import with_embeddings

        model = with_embeddings(model, [os.path.expanduser(config.embeddings_dir)])
    return model


def generation_parameters(config, spec: SamplingSpec, seed: int, model_name: str,
                          adapters=(), lora_mode: str = "runtime", controls=(),
                          arch=None) -> dict:
    """The PNG `parameters` settings of one image (`adapters`: the `Weighted` LoRAs it was drawn
    with, as `Generator.adapters_for` gives them; `controls`: its ControlNets, as
    `controls_from` gives them)."""
    settings = {"Steps": spec.steps, "Sampler": spec.sampler, "CFG scale": config.cfg_scale,
                "Seed": seed, "Size": f"{spec.width}x{spec.height}", "Model": model_name}
    if config.guidance_rescale:
        settings["Guidance rescale"] = config.guidance_rescale
    if spec.guidance_interval:
        start, end = spec.guidance_interval
        settings["Guidance interval"] = f"{start:g}-{end:g}"
    if arch is not None and arch.family == "flux" and arch.transformer.guidance_embeds:
        settings["Distilled CFG Scale"] = getattr(config, "embedded_guidance", 3.5)
    # Skip-layer guidance acts with classifier-free guidance only: at scale 1 it did not run.
    if spec.slg_layers and spec.guidance and float(config.cfg_scale) != 1.0:
        settings["SLG"] = (f"layers {','.join(map(str, spec.slg_layers))} scale "
                           f"{getattr(config, 'slg_scale', 2.8)} from {spec.slg_start} to {spec.slg_stop}")
    if spec.max_sequence_length:
        settings["T5 tokens"] = spec.max_sequence_length
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
    settings.update(control_parameters(controls, spec.guess_mode))
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
    # The first request checked whole (prompt syntax, LoRAs, ControlNets, images, mask, sizes)
    # before anything is written. Every request of the run applies the same LoRAs and ControlNets.
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
                                      generator.adapter_mode, first_request.controls,
                                      generator.arch))
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
    check_control_settings(config)
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
