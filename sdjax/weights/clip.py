"""transformers CLIP checkpoints -> sdjax CLIP params.

Key layouts accepted: transformers 4 / real SD checkpoints (`text_model.embeddings...`),
transformers 5 `save_pretrained` of a bare CLIPTextModel / CLIPVisionModel (no tower prefix),
the `*WithProjection` models (`text_projection.weight`, `visual_projection.weight`) and CLIPModel.
A CLIPModel's text tower also becomes a diffusion model's text encoder (`text_encoder_from_clip`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax.models.clip import (CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                               CLIPVisionModel)
from sdjax.weights.common import (DictSource, MergedSource, SafetensorsFile, TensorSource,
                                  WeightsError, abstract_params, convert_state_dict, regex_renamer,
                                  save_params_tree, write_native_folder)

_TOWER = r"(text_model|vision_model)"

# transformers name (with tower prefix) -> sdjax path in a CLIPModel params tree.
CLIP_RULES = (
    (_TOWER + r"\.encoder\.layers\.(\d+)\.(self_attn|mlp)\.([qkv]_proj|out_proj|fc[12])\.weight",
     r"\1/layers_\2/\3/\4/kernel"),
    (_TOWER + r"\.encoder\.layers\.(\d+)\.(self_attn|mlp)\.([qkv]_proj|out_proj|fc[12])\.bias",
     r"\1/layers_\2/\3/\4/bias"),
    (_TOWER + r"\.encoder\.layers\.(\d+)\.(layer_norm[12])\.weight", r"\1/layers_\2/\3/scale"),
    (_TOWER + r"\.encoder\.layers\.(\d+)\.(layer_norm[12])\.bias", r"\1/layers_\2/\3/bias"),
    (_TOWER + r"\.embeddings\.(token_embedding|position_embedding)\.weight", r"\1/\2/embedding"),
    (_TOWER + r"\.embeddings\.position_ids", ""),  # a buffer, saved by transformers 4
    (r"text_model\.final_layer_norm\.weight", "text_model/final_layer_norm/scale"),
    (r"text_model\.final_layer_norm\.bias", "text_model/final_layer_norm/bias"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "vision_model/patch_embedding/kernel"),
    (r"vision_model\.embeddings\.class_embedding", "vision_model/class_embedding"),
    (r"vision_model\.pre_layrnorm\.weight", "vision_model/pre_layernorm/scale"),
    (r"vision_model\.pre_layrnorm\.bias", "vision_model/pre_layernorm/bias"),
    (r"vision_model\.post_layernorm\.weight", "vision_model/post_layernorm/scale"),
    (r"vision_model\.post_layernorm\.bias", "vision_model/post_layernorm/bias"),
    (r"text_projection\.weight", "text_model/text_projection/kernel"),
    (r"visual_projection\.weight", "vision_model/visual_projection/kernel"),
    (r"logit_scale", "logit_scale"),
)
_rename = regex_renamer(CLIP_RULES)

_PROJECTIONS = {"text_model": "text_projection.weight", "vision_model": "visual_projection.weight"}


def _tower_renamer(tower: str) -> Callable[[str], Optional[str]]:
    """Renamer for a single-tower file, whose keys may lack the tower prefix (transformers 5)."""
    prefix = tower + "."

    def rename(key: str) -> Optional[str]:
        if not key.startswith(prefix) and key != _PROJECTIONS[tower]:
            key = prefix + key
        return _rename(key)

    return rename


def clip_text_shapes(config: CLIPTextConfig) -> dict:
    """Shapes and dtypes of `CLIPTextModel(config)`'s params (nothing allocated)."""
    return abstract_params(CLIPTextModel(config), jnp.zeros((1, 1), jnp.int32))


def clip_vision_shapes(config: CLIPVisionConfig) -> dict:
    return abstract_params(CLIPVisionModel(config), jnp.zeros(
        (1, config.image_size, config.image_size, config.num_channels)))


def clip_text_params(source: TensorSource, config: CLIPTextConfig, dtype=None) -> dict:
    """Params for `CLIPTextModel(config)` from a CLIPTextModel[WithProjection] state dict."""
    return convert_state_dict(source, _tower_renamer("text_model"),
                              {"text_model": clip_text_shapes(config)},
                              what="CLIP text encoder", dtype=dtype)["text_model"]


def clip_vision_params(source: TensorSource, config: CLIPVisionConfig, dtype=None) -> dict:
    """Params for `CLIPVisionModel(config)` from a CLIPVisionModel[WithProjection] state dict."""
    return convert_state_dict(source, _tower_renamer("vision_model"),
                              {"vision_model": clip_vision_shapes(config)},
                              what="CLIP vision encoder", dtype=dtype)["vision_model"]


def clip_params(source: TensorSource, config: CLIPConfig, dtype=None) -> dict:
    """Params for `CLIPModel(config)` from a transformers CLIPModel state dict."""
    expected = {"text_model": clip_text_shapes(config.text),
                "vision_model": clip_vision_shapes(config.vision),
                "logit_scale": jnp.zeros((), jnp.float32)}
    return convert_state_dict(source, _rename, expected, what="CLIP model", dtype=dtype)


def text_encoder_from_clip(config: CLIPConfig, params: dict) -> tuple[CLIPTextConfig, dict]:
    """A CLIPModel's text tower (sdjax params) as a diffusion model's text encoder: its config
    without the projection, which the U-Net never reads, and the tower's params without it,
    checked against that config's shapes."""
    text_config = dataclasses.replace(config.text, projection_dim=None)
    tower = {k: v for k, v in params["text_model"].items() if k != "text_projection"}
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tower).items()}
    text_params = convert_state_dict(DictSource(flat, name="CLIP text tower"), lambda key: key,
                                     clip_text_shapes(text_config), what="text_encoder",
                                     reference_layout=False)
    return text_config, text_params


def open_transformers_weights(folder: str | os.PathLike) -> TensorSource:
    """The safetensors weights of a transformers folder: `model.safetensors`, or the shards
    listed in `model.safetensors.index.json`."""
    folder = os.fspath(folder)
    single = os.path.join(folder, "model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return SafetensorsFile(single)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise WeightsError(f"{index}: not a safetensors index ({err!r})") from None
        return MergedSource([SafetensorsFile(os.path.join(folder, s)) for s in shards], name=index)
    others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".ckpt"))) \
        if os.path.isdir(folder) else []
    hint = f" (found {', '.join(others)}; convert it to safetensors)" if others else ""
    raise WeightsError(f"{single}: no such file, nor {os.path.basename(index)}{hint}")


def read_config_json(folder: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(folder), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: cannot read the model config ({err})") from None


def load_clip_text_folder(path: str | os.PathLike, dtype=None, *,
                          attention: str = "xla") -> tuple[CLIPTextConfig, dict]:
    """(config, params) of a transformers CLIPTextModel[WithProjection] folder (a diffusers
    `text_encoder`/`text_encoder_2` folder), or the text tower of a whole CLIPModel folder. A
    projection is expected when the config's architecture says so, or, with no architecture
    named, when the weights hold one."""
    return _load_tower_folder(path, "text_model", CLIPTextConfig, clip_text_params, dtype, attention)


def load_clip_vision_folder(path: str | os.PathLike, dtype=None, *,
                            attention: str = "xla") -> tuple[CLIPVisionConfig, dict]:
    """(config, params) of a transformers CLIPVisionModel[WithProjection] folder, or the vision
    tower of a whole CLIPModel folder."""
    return _load_tower_folder(path, "vision_model", CLIPVisionConfig, clip_vision_params, dtype,
                              attention)


def _load_tower_folder(path, tower: str, config_class, params_of, dtype, attention: str):
    raw = read_config_json(path)
    source = open_transformers_weights(path)
    whole_model_key = tower.replace("_model", "_config")  # text_config / vision_config
    with_projection = None
    if not raw.get("architectures") and whole_model_key not in raw:
        with_projection = _PROJECTIONS[tower] in source
    config = config_class.from_transformers(raw, with_projection=with_projection,
                                            attention=attention)
    if whole_model_key in raw:  # a whole CLIPModel folder: take this tower
        return config, _subtree(source, config, tower, dtype)
    return config, params_of(source, config, dtype)


def load_clip_folder(path: str | os.PathLike, dtype=None, *,
                     attention: str = "xla") -> tuple[CLIPConfig, dict]:
    """(config, params) of a transformers CLIPModel folder."""
    raw = read_config_json(path)
    if "text_config" not in raw or "vision_config" not in raw:
        raise WeightsError(f"{os.path.join(os.fspath(path), 'config.json')}: not a CLIPModel "
                           "config (no text_config / vision_config)")
    config = CLIPConfig.from_transformers(raw, attention=attention)
    return config, clip_params(open_transformers_weights(path), config, dtype)


def _subtree(source: TensorSource, config, tower: str, dtype) -> dict:
    """One tower of a CLIPModel file; the other tower's keys are skipped, not errors."""
    other = "vision_model" if tower == "text_model" else "text_model"
    ignore = [re.escape(other) + r"\..*", re.escape(_PROJECTIONS[other]), "logit_scale"]
    expected = clip_text_shapes(config) if tower == "text_model" else clip_vision_shapes(config)
    return convert_state_dict(source, _rename, {tower: expected}, what=f"CLIP {tower}",
                              dtype=dtype, ignore=ignore)[tower]



# --- the native CLIP folder ------------------------------------------------------------------------

NATIVE_CLIP_MANIFEST = "sdjax_clip.json"
NATIVE_CLIP_FORMAT_VERSION = 1


def save_clip_native(path: str | os.PathLike, config: CLIPConfig, params: dict,
                     tokenizer=None, *, overwrite: bool = False) -> None:
    """A whole CLIP model (text and vision towers) as a native folder: sdjax_clip.json (config),
    params/ (orbax), tokenizer/ (optional). Written like `save_pretrained`: nothing else in the
    folder is touched (`common.write_native_folder`)."""
    manifest = {"format": "sdjax-clip", "version": NATIVE_CLIP_FORMAT_VERSION,
                "config": config.to_dict()}

    def write_entries(staging: pathlib.Path) -> None:
        save_params_tree(staging / "params", params)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / "tokenizer")

    write_native_folder(path, NATIVE_CLIP_MANIFEST, manifest, write_entries,
                        ("params", "tokenizer"), overwrite=overwrite)


def load_clip_native(folder: str | os.PathLike, dtype=None) -> tuple[CLIPConfig, dict]:
    """(config, params) of a folder `save_clip_native` wrote, checked against the config."""
    import orbax.checkpoint as ocp

    folder = pathlib.Path(folder).expanduser()
    manifest_file = folder / NATIVE_CLIP_MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        found = (manifest.get("format"), manifest.get("version"))
        if found != ("sdjax-clip", NATIVE_CLIP_FORMAT_VERSION):
            raise ValueError(f"format={found[0]!r}, version={found[1]!r}")
        config = CLIPConfig.from_dict(manifest["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{manifest_file}: not an sdjax CLIP v{NATIVE_CLIP_FORMAT_VERSION} "
                           f"manifest ({err})") from None
    try:
        restored = ocp.StandardCheckpointer().restore(folder.absolute() / "params")
    except Exception as err:  # noqa: BLE001 - orbax raises many types for a damaged folder
        raise WeightsError(f"{folder / 'params'}: cannot restore params ({err})") from None
    expected = {"text_model": clip_text_shapes(config.text),
                "vision_model": clip_vision_shapes(config.vision),
                "logit_scale": jnp.zeros((), jnp.float32)}
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(restored).items()}
    params = convert_state_dict(DictSource(flat, name=str(folder / "params")), lambda key: key,
                                expected, what="CLIP model", dtype=dtype, reference_layout=False)
    return config, params
