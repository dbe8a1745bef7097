"""diffusers `UNet2DConditionModel` weights -> sdjax `UNet` params, and diffusers U-Net folders."""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Optional

import jax.numpy as jnp

from sdjax.models.unet import NUM_TIME_IDS, UNet, UNetConfig
from sdjax.weights.common import (MergedSource, SafetensorsFile, TensorSource, WeightsError,
                                  abstract_params, convert_state_dict, inverse_key,
                                  read_model_config, regex_renamer)

# diffusers name -> sdjax path, first full match wins. The targets keep dots for module nesting;
# `rename_key` then turns list indices into `_i` suffixes and dots into slashes
# (down_blocks.0.attentions.1.norm.weight -> down_blocks_0/attentions_1/norm/scale).
_RULES = (
    # diffusers wraps these in lists: to_out = [Linear, Dropout], ff.net = [GEGLU, Dropout, Linear].
    (r"(.+)\.to_out\.0\.weight", r"\1.to_out.kernel"),
    (r"(.+)\.to_out\.0\.bias", r"\1.to_out.bias"),
    (r"(.+)\.ff\.net\.0\.proj\.weight", r"\1.ff.proj.kernel"),
    (r"(.+)\.ff\.net\.0\.proj\.bias", r"\1.ff.proj.bias"),
    (r"(.+)\.ff\.net\.2\.weight", r"\1.ff.out.kernel"),
    (r"(.+)\.ff\.net\.2\.bias", r"\1.ff.out.bias"),
    (r"(.+)\.downsamplers\.0\.conv\.weight", r"\1.downsample.conv.kernel"),
    (r"(.+)\.downsamplers\.0\.conv\.bias", r"\1.downsample.conv.bias"),
    (r"(.+)\.upsamplers\.0\.conv\.weight", r"\1.upsample.conv.kernel"),
    (r"(.+)\.upsamplers\.0\.conv\.bias", r"\1.upsample.conv.bias"),
    # GroupNorm / LayerNorm weights are flax `scale`s: norm, norm1..3, conv_norm_out.
    (r"(.+\.norm\d?|conv_norm_out)\.weight", r"\1.scale"),
    (r"(.+)\.weight", r"\1.kernel"),
)
_table = regex_renamer(_RULES)
_INDEX = re.compile(r"[./](\d+)(?=[./]|$)")


def rename_key(key: str) -> Optional[str]:
    """The sdjax params path of a diffusers U-Net state-dict key (None: not a parameter)."""
    path = _table(key)
    return None if path is None else _INDEX.sub(r"_\1", path).replace(".", "/")


# sdjax module names that diffusers holds in lists (`down_blocks.0`), which `rename_key` writes
# `down_blocks_0`; other names ending in a number (`linear_1`, `attn1`) are diffusers' own.
_LIST_MODULES = re.compile(r"(down_blocks|up_blocks|resnets|attentions|transformer_blocks|blocks"
                           r"|controlnet_down_blocks)_(\d+)")
# sdjax paths whose diffusers modules sit inside a list (`to_out.0`) or have other names.
_DIFFUSERS_MODULES = ((re.compile(r"(^|\.)to_out$"), r"\1to_out.0"),
                      (re.compile(r"(^|\.)ff\.proj$"), r"\1ff.net.0.proj"),
                      (re.compile(r"(^|\.)ff\.out$"), r"\1ff.net.2"),
                      (re.compile(r"(^|\.)downsample\.conv$"), r"\1downsamplers.0.conv"),
                      (re.compile(r"(^|\.)upsample\.conv$"), r"\1upsamplers.0.conv"))


def diffusers_key(path: str) -> str:
    """The diffusers state-dict key of an sdjax U-Net (or ControlNet) params path, the inverse of
    `rename_key` (checked against it): `down_blocks_0/attentions_0/proj_in/kernel` ->
    `down_blocks.0.attentions.0.proj_in.weight`."""
    def module_of(modules):
        return ".".join(_LIST_MODULES.sub(r"\1.\2", m) if _LIST_MODULES.fullmatch(m) else m
                        for m in modules)
    return inverse_key(path, rename_key, _DIFFUSERS_MODULES, "diffusers", module_of=module_of)


def example_inputs(config: UNetConfig, dtype=jnp.float32):
    """The smallest inputs `UNet.init` accepts for `config` (params do not depend on sizes)."""
    f = config.downsample_factor
    inputs = (jnp.zeros((1, f, f, config.in_channels), dtype), jnp.zeros((1,), jnp.float32),
              jnp.zeros((1, 1, config.cross_attention_dim), dtype))
    if config.addition_embed_type == "text_time":
        added = {"text_embeds": jnp.zeros((1, config.text_embeds_dim), dtype),
                 "time_ids": jnp.zeros((1, NUM_TIME_IDS), jnp.float32)}
        return inputs + (added,)
    return inputs


def unet_params(source: TensorSource, config: UNetConfig, dtype=None) -> dict:
    """Params for `UNet(config)` from a diffusers-named state dict. `dtype` None keeps float32."""
    return convert_state_dict(source, rename_key, unet_shapes(config), what="U-Net", dtype=dtype)


def unet_shapes(config: UNetConfig) -> dict:
    """Shapes and dtypes of `UNet(config)`'s params (nothing allocated)."""
    return abstract_params(UNet(config), *example_inputs(config))


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# diffusers' variant naming: the variant goes before the extension (of the index too).
FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"
FP16_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.fp16.json"


def load_unet_folder(path: str | os.PathLike, dtype=None) -> tuple[UNetConfig, dict]:
    """A diffusers `UNet2DConditionModel` folder (`config.json` + safetensors weights, single or
    sharded, plain or the fp16 variant) -> (UNetConfig, params)."""
    folder = pathlib.Path(path)
    raw = read_model_config(folder, "UNet2DConditionModel")
    try:
        config = UNetConfig.from_diffusers(raw)
    except ValueError as err:
        raise WeightsError(f"{folder / 'config.json'}: {err}") from None
    return config, unet_params(open_weights(folder), config, dtype=dtype)


def open_weights(folder: pathlib.Path, what: str = "U-Net") -> TensorSource:
    """The weights of a diffusers model folder: single or sharded safetensors, plain or the fp16
    variant (pickled `.bin` weights are refused)."""
    for single, index in ((WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
                          (FP16_WEIGHTS_NAME, FP16_WEIGHTS_INDEX_NAME)):
        if (folder / single).is_file():
            return SafetensorsFile(folder / single)
        if (folder / index).is_file():
            return _open_sharded(folder / index)
    pickled = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.bin"))
    if pickled:
        raise WeightsError(f"{folder}: only pickled weights ({', '.join(pickled)}); sdjax reads "
                           f"safetensors only (re-save the model with safe_serialization=True)")
    raise WeightsError(f"{folder}: no {what} weights (looked for {WEIGHTS_NAME}, "
                       f"{WEIGHTS_INDEX_NAME}, {FP16_WEIGHTS_NAME}, {FP16_WEIGHTS_INDEX_NAME})")


def _open_sharded(index_path: pathlib.Path) -> TensorSource:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError) as err:
        raise WeightsError(f"{index_path}: not a safetensors index ({err!r})") from None
    source = MergedSource([SafetensorsFile(index_path.parent / s) for s in shards],
                          name=str(index_path))
    absent = sorted(set(weight_map) - set(source))
    if absent:
        raise WeightsError(f"{index_path}: lists tensors its shards lack: {', '.join(absent[:8])}"
                           + (f", ... ({len(absent)} in all)" if len(absent) > 8 else ""))
    return source


__all__ = ["unet_params", "load_unet_folder", "open_weights", "diffusers_key", "WEIGHTS_NAME",
           "WEIGHTS_INDEX_NAME", "FP16_WEIGHTS_NAME", "FP16_WEIGHTS_INDEX_NAME"]
