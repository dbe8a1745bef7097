"""diffusers-format KL autoencoders (`AutoencoderKL` folders) -> sdjax `VAEConfig` and params."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp

from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.weights.common import (MergedSource, SafetensorsFile, TensorSource, WeightsError,
                                  abstract_params, convert_state_dict, regex_renamer)

_BLOCK = r"(encoder|decoder)\.(down|up)_blocks\.(\d+)"
_MID = r"(encoder|decoder)\.mid_block"

# diffusers module path -> (sdjax module path, layer kind). The kind names the sdjax leaf that
# `.weight` becomes; `.bias` stays `bias`. The mid-block attention accepts both the current names
# (to_q, to_k, to_v, to_out.0) and the legacy ones older diffusers saved (query, key, value, proj_attn).
_MODULES = (
    (r"(encoder|decoder)\.(conv_in|conv_out)", r"\1/\2", "conv"),
    (r"(encoder|decoder)\.conv_norm_out", r"\1/conv_norm_out", "norm"),
    (_BLOCK + r"\.resnets\.(\d+)\.(conv1|conv2|conv_shortcut)", r"\1/\2_blocks_\3/resnets_\4/\5", "conv"),
    (_BLOCK + r"\.resnets\.(\d+)\.(norm1|norm2)", r"\1/\2_blocks_\3/resnets_\4/\5", "norm"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder/down_blocks_\1/downsample/conv",
     "conv"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", r"decoder/up_blocks_\1/upsample/conv", "conv"),
    (_MID + r"\.resnets\.([01])\.(conv1|conv2|conv_shortcut)", r"\1/mid_block/resnets_\2/\3", "conv"),
    (_MID + r"\.resnets\.([01])\.(norm1|norm2)", r"\1/mid_block/resnets_\2/\3", "norm"),
    (_MID + r"\.attentions\.0\.group_norm", r"\1/mid_block/attention/group_norm", "norm"),
    (_MID + r"\.attentions\.0\.(?:to_q|query)", r"\1/mid_block/attention/to_q", "dense"),
    (_MID + r"\.attentions\.0\.(?:to_k|key)", r"\1/mid_block/attention/to_k", "dense"),
    (_MID + r"\.attentions\.0\.(?:to_v|value)", r"\1/mid_block/attention/to_v", "dense"),
    (_MID + r"\.attentions\.0\.(?:to_out\.0|proj_attn)", r"\1/mid_block/attention/to_out", "dense"),
    (r"(quant_conv|post_quant_conv)", r"\1", "conv"),
)
_WEIGHT_LEAF = {"conv": "kernel", "dense": "kernel", "norm": "scale"}

_rename = regex_renamer(
    [(pattern + r"\.weight", replacement + "/" + _WEIGHT_LEAF[kind])
     for pattern, replacement, kind in _MODULES]
    + [(pattern + r"\.bias", replacement + "/bias") for pattern, replacement, _ in _MODULES])

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def vae_params(source: TensorSource, config: VAEConfig, dtype=None) -> dict:
    """Params of `AutoencoderKL(config)` from a diffusers-named state dict. `dtype` casts every
    tensor (default: float32, the module's param_dtype)."""
    return convert_state_dict(source, _rename, vae_shapes(config), what="AutoencoderKL", dtype=dtype)


def vae_shapes(config: VAEConfig) -> dict:
    """Shapes and dtypes of `AutoencoderKL(config)`'s params (nothing allocated)."""
    size = 8 * config.downsample_factor
    return abstract_params(AutoencoderKL(config), jnp.zeros((1, size, size, config.in_channels)))


def load_vae_folder(path: str | os.PathLike, dtype=None) -> tuple[VAEConfig, dict]:
    """(config, params) from a diffusers `AutoencoderKL` folder: config.json and
    diffusion_pytorch_model[.fp16].safetensors (or a sharded safetensors index)."""
    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise WeightsError(f"{config_path}: no such file")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"{config_path}: not a readable JSON config ({err})") from None
    class_name = raw.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise WeightsError(f"{config_path}: _class_name is {class_name!r}, expected 'AutoencoderKL'")
    try:
        config = VAEConfig.from_diffusers(raw)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return config, vae_params(_open_weights(path), config, dtype=dtype)


def _open_weights(path: str) -> TensorSource:
    for name in WEIGHTS_NAMES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return SafetensorsFile(candidate)
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise WeightsError(f"{index_path}: not a readable safetensors index ({err})") from None
        return MergedSource([SafetensorsFile(os.path.join(path, s)) for s in shards], name=index_path)
    hint = (" (only a pickled .bin is present; convert it to safetensors)"
            if os.path.isfile(os.path.join(path, "diffusion_pytorch_model.bin")) else "")
    raise WeightsError(f"{path}: no {' or '.join(WEIGHTS_NAMES)}{hint}")

