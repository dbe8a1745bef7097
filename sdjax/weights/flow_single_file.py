"""Single-file SD3 / SD3.5 and Flux.1 checkpoints as people download them.

- SD3 / SD3.5: the MMDiT under `model.diffusion_model.` (`joint_blocks.N...`), usually with the VAE
  under `first_stage_model.` and, in the "with text encoders" files, CLIP-L, CLIP-G and T5-XXL under
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`.
- Flux.1: BFL's original transformer layout (`double_blocks.N...`, `single_blocks.N...`), bare or
  under `model.diffusion_model.`; packed files may add `vae.` / `first_stage_model.` and
  `text_encoders.*` the same way.

What a file does not bundle (Flux files hold the transformer alone; no file holds a T5 tokenizer)
comes from `components`, a diffusers folder of the same family. Float8 (`float8_e4m3fn`) weights
are upcast to the requested dtype as they are read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Optional

from sdjax.models.clip import CLIPTextConfig
from sdjax.models.vae import VAEConfig
from sdjax.text.tokenizer import CLIPTokenizer
from sdjax.weights import clip as clip_weights
from sdjax.weights import flux as flux_weights
from sdjax.weights import mmdit as mmdit_weights
from sdjax.weights import t5 as t5_weights
from sdjax.weights import vae as vae_weights
from sdjax.weights.common import RenamedSource, SafetensorsFile, WeightsError, short_list
from sdjax.weights.single_file import clip_text_config, read_header, read_vae_file

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Bundled text encoders: (prefix, params name per family, CLIP activation or "t5").
TEXT_PREFIXES = {
    "sd3": (("text_encoders.clip_l.transformer.", "text_encoder", "quick_gelu"),
            ("text_encoders.clip_g.transformer.", "text_encoder_2", "gelu"),
            ("text_encoders.t5xxl.transformer.", "text_encoder_3", "t5")),
    "flux": (("text_encoders.clip_l.transformer.", "text_encoder", "quick_gelu"),
             ("text_encoders.t5xxl.transformer.", "text_encoder_2", "t5")),
}
# What the released models' diffusers folders hold (latent scaling, scheduler), for files read
# without `components`.
VAE_SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
SCHEDULERS = {
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0},
    "flux_dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                 "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "flux_schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler",
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
}


def _strip(keys, prefix: str) -> list[str]:
    return [k[len(prefix):] for k in keys if k.startswith(prefix)]


def _transformer_keys(keys: list[str]) -> tuple[str, list[str]]:
    """(prefix, the transformer's keys without it): under model.diffusion_model., or bare."""
    under = _strip(keys, TRANSFORMER_PREFIX)
    if under:
        return TRANSFORMER_PREFIX, under
    others = VAE_PREFIXES + tuple(p for parts in TEXT_PREFIXES.values() for p, _, _ in parts)
    return "", [k for k in keys if not k.startswith(others)]


def file_family(keys: list[str]) -> Optional[str]:
    """"sd3" / "flux" when the keys hold an MMDiT or a Flux transformer, else None."""
    _, body = _transformer_keys(keys)
    if mmdit_weights.is_original_mmdit(body):
        return "sd3"
    if flux_weights.is_original_flux(body):
        return "flux"
    return None


def is_flow_file(path: str | os.PathLike) -> bool:
    return file_family(list(read_header(os.fspath(path)))) is not None


def _prefixed(source: SafetensorsFile, keys: list[str], prefix: str) -> RenamedSource:
    return RenamedSource(source, {k[len(prefix):]: (k, None) for k in keys if k.startswith(prefix)})


def _missing_parts(family: str, keys: list[str]) -> list[str]:
    """The parts a file of `family` does not bundle, from its key names: its VAE, text encoders
    (SD3 runs without T5, never without CLIP) and T5's tokenizer (no file holds one)."""
    names = [name for _, name, _ in TEXT_PREFIXES[family]]
    bundled = {name for prefix, name, _ in TEXT_PREFIXES[family]
               if any(k.startswith(prefix) for k in keys)}
    missing = [n for n in names
               if n not in bundled and not (family == "sd3" and n == "text_encoder_3")]
    if not any(k.startswith(VAE_PREFIXES) for k in keys):
        missing.insert(0, "vae")
    if names[-1] in bundled:
        missing.append(names[-1].replace("text_encoder", "tokenizer"))
    return missing


def load_flow_single_file(path: str | os.PathLike, dtype, *,
                          components: Optional[str | os.PathLike] = None):
    """A `Pretrained` from an SD3 / Flux single file, completed from `components` if given."""
    from sdjax.weights.pretrained import Pretrained, flow_family, flow_folder_parts

    path = pathlib.Path(path)
    header = read_header(os.fspath(path))
    keys = list(header)
    family = file_family(keys)
    source = SafetensorsFile(path)
    prefix, body = _transformer_keys(keys)
    transformer_source = RenamedSource(source, {k: (prefix + k, None) for k in body})
    # Said before anything is read: a Flux transformer alone is gigabytes.
    missing = _missing_parts(family, keys)
    if missing and components is None:
        raise WeightsError(f"{path}: the file holds no {short_list(missing)}: pass components= "
                           f"(--components) a diffusers {family} folder to take them from")
    # What a file cannot say about its transformer (Flux's rotary split, SD3's sample_size) comes
    # from the components folder's config when there is one.
    stated = {}
    if components is not None:
        components = pathlib.Path(components).expanduser()
        if not (components / "model_index.json").is_file():
            raise WeightsError(f"{components}: not a diffusers folder (no model_index.json)")
        if flow_family(components) != family:
            raise WeightsError(f"{components}: a {flow_family(components)} folder cannot complete "
                               f"the {family} file {path}")
        stated = json.loads((components / "transformer" / "config.json").read_text())
    if family == "sd3":
        config = mmdit_weights.mmdit_config_from_original(transformer_source)
        if "sample_size" in stated:
            config = dataclasses.replace(config, sample_size=int(stated["sample_size"]))
        transformer = mmdit_weights.mmdit_params_from_original(transformer_source, config, dtype)
        scheduler = SCHEDULERS["sd3"]
    else:
        axes = stated.get("axes_dims_rope")
        config = flux_weights.flux_config_from_original(
            transformer_source, axes_dims_rope=None if axes is None else tuple(axes))
        transformer = flux_weights.flux_params_from_original(transformer_source, config, dtype)
        scheduler = SCHEDULERS["flux_dev" if config.guidance_embeds else "flux_schnell"]
    params = {"transformer": transformer}

    vae_config = None
    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if vae_prefix is not None:
        scaling, shift = VAE_SCALING[family]
        vae_dict, vae_source = read_vae_file(path, scaling_factor=scaling, prefix=vae_prefix)
        vae_config = dataclasses.replace(VAEConfig.from_diffusers(vae_dict), shift_factor=shift)
        params["vae"] = vae_weights.vae_params(vae_source, vae_config, dtype=dtype)

    text = {}
    for text_prefix, name, kind in TEXT_PREFIXES[family]:
        if not any(k.startswith(text_prefix) for k in keys):
            continue
        part = _prefixed(source, keys, text_prefix)
        if kind == "t5":
            t5_config = t5_weights.t5_config_from_source(part)
            text[name] = (t5_config, t5_weights.t5_params(part, t5_config, dtype), None)
        else:
            shapes = {k: source.shape(text_prefix + k) for k in part}
            try:
                clip_config = CLIPTextConfig.from_transformers(clip_text_config(shapes,
                                                                                hidden_act=kind))
            except KeyError as err:
                raise WeightsError(f"{path}: the text encoder under {text_prefix!r} is not in "
                                   f"transformers' CLIP layout (no {err.args[0]!r})") from None
            pad = "!" if kind == "gelu" else "<|endoftext|>"
            text[name] = (clip_config, clip_weights.clip_text_params(part, clip_config, dtype),
                          CLIPTokenizer.default(pad_token=pad))

    names = [name for _, name, _ in TEXT_PREFIXES[family]]
    t5_tokenizer = names[-1].replace("text_encoder", "tokenizer")
    if components is not None:
        if family == "sd3" and "text_encoder_3" not in text and (components / "text_encoder_3").is_dir():
            missing.append("text_encoder_3")  # the folder's T5, which the file may do without
        parts = flow_folder_parts(components, (*missing, "scheduler"), dtype)
        scheduler = parts["scheduler"]
        if "vae" in parts:
            vae_config, params["vae"] = parts["vae"]
        for name in names:
            if name in parts:
                text[name] = parts[name]
        if t5_tokenizer in parts:
            text[names[-1]] = text[names[-1]][:2] + (parts[t5_tokenizer],)
    configs, tokenizers = [], []
    for name in names:
        if name in text:
            configs.append(text[name][0])
            params[name] = text[name][1]
            tokenizers.append(text[name][2])
    return Pretrained(family=family, unet_config=None, vae_config=vae_config,
                      text_configs=tuple(configs), tokenizers=tuple(tokenizers), params=params,
                      scheduler_config=dict(scheduler), source=str(path), transformer_config=config)
