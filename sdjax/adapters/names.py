"""The names adapter files give a model's layers, mapped to sdjax layer paths.

Files name a layer in these ways, all accepted for every model:
- diffusers / transformers module names (peft files): `down_blocks.0.attentions.0.transformer_
  blocks.0.attn1.to_q`, `text_model.encoder.layers.0.self_attn.q_proj`;
- the original LDM U-Net's names (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), which SDXL
  LoRAs use;
- transformers 5's text-encoder names, which drop `text_model.` (`encoder.layers.0.self_attn.q_proj`);
- Flux's original (Black Forest Labs) names, which kohya's and ComfyUI's Flux LoRAs use
  (`double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`, `final_layer.adaLN_modulation.1`):
  a module that the original model fuses from several sdjax layers, or whose output rows it orders
  otherwise, is a list of parts, each a layer and the rows of the module's output it takes;
- any of those with dots flattened to underscores (kohya / WebUI keys after `lora_unet_`,
  `lora_te_`, `lora_te1_`, `lora_te2_`).
The table is built from the model's own params and config, and each diffusers name is checked
against the checkpoint converter's renaming (weights.unet, and weights.mmdit / weights.flux for the
SD3 and Flux transformers; Flux's original names are the converter's own table), so the two can
never disagree.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

from flax import traverse_util

from sdjax.models.unet import UNetConfig
from sdjax.weights import flux as flux_weights
from sdjax.weights import mmdit as mmdit_weights
from sdjax.weights import unet as unet_weights

# sdjax path pieces whose diffusers names are list items (text-encoder layers included).
_INDEXED = re.compile(r"^(down_blocks|up_blocks|attentions|resnets|transformer_blocks|layers)_(\d+)$")
# diffusers resnet layer -> the original ResBlock's.
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# The flow families' transformer params path -> diffusers state-dict key, by family.
_TRANSFORMER_KEYS = {"sd3": mmdit_weights.diffusers_key, "flux": flux_weights.diffusers_key}
_LDM_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_out": "out.2"}


# One sdjax layer of a file's module: (its path, what it takes of the module's output rows, given
# a PyTorch-layout (out, ...) array; None: all of them, in order).
Part = tuple[str, Optional[Callable[[Any], Any]]]


@dataclasses.dataclass(frozen=True)
class LayerNames:
    """For each model of a checkpoint ("unet" or "transformer", "text_encoder"[,
    "text_encoder_2"]): every name a file may use for a layer -> its sdjax path, and each path's
    diffusers / transformers name; `fused`: the names of modules that are parts of sdjax layers
    (Flux's original `qkv`, `linear1`, final modulation) -> their parts."""
    aliases: Mapping[str, Mapping[str, str]]
    reference: Mapping[str, Mapping[str, str]]
    original: Mapping[str, str] = dataclasses.field(default_factory=dict)  # U-Net path -> LDM name
    fused: Mapping[str, Mapping[str, tuple[Part, ...]]] = dataclasses.field(default_factory=dict)

    def find(self, model: str, name: str):
        """The sdjax path `name` denotes in `model`, or None."""
        return self.aliases.get(model, {}).get(name)

    def parts(self, model: str, name: str) -> Optional[tuple[Part, ...]]:
        """The parts of the fused module `name` of `model`, or None."""
        return self.fused.get(model, {}).get(name)

    def kohya_name(self, model: str, path: str, *, original: bool = False) -> str:
        """The flattened name kohya writes (without its `lora_unet_`-style prefix): the
        diffusers / transformers name, or with `original` the LDM U-Net's (kohya's SDXL names)."""
        name = self.original.get(path) if original and model == "unet" else None
        return (name or self.reference[model][path]).replace(".", "_")


def layer_names(params: Mapping, unet_config: Optional[UNetConfig], family: str = "", *,
                transformer_config=None) -> LayerNames:
    """The name table of a model's adaptable layers (its dense and conv kernels). The flow
    families (`family` "sd3" or "flux") name their transformer's layers as diffusers'
    `SD3Transformer2DModel` / `FluxTransformer2DModel` do, and with its `transformer_config` Flux
    also as the original model does; their T5 encoders have no names here."""
    aliases: dict[str, dict[str, str]] = {}
    reference: dict[str, dict[str, str]] = {}
    original: dict[str, str] = {}
    fused: dict[str, dict[str, tuple[Part, ...]]] = {}
    models = ("unet", "text_encoder") + (("transformer",) if family in _TRANSFORMER_KEYS else ()) \
        + (() if family == "flux" else ("text_encoder_2",))  # Flux's second encoder is T5
    for model, tree in params.items():
        if model not in models:
            continue
        paths = ["/".join(k[:-1]) for k, v in traverse_util.flatten_dict(tree).items()
                 if k[-1] == "kernel" and len(getattr(v, "shape", ())) in (2, 4)]
        if model == "transformer":
            names = {p: _TRANSFORMER_KEYS[family](p + "/kernel").removesuffix(".weight")
                     for p in paths}
            extra = {}
        elif model == "unet":
            ldm = _ldm_names(unet_config)
            names = {p: _diffusers_unet_name(p) for p in paths}
            extra = {p: ldm.get(n) for p, n in names.items()}
            original = {p: n for p, n in extra.items() if n}
        else:
            names = {p: _transformers_text_name(p) for p in paths}
            # transformers 5 names CLIPTextModel's modules without `text_model.` (peft files
            # written from it too).
            extra = {p: n.removeprefix("text_model.") for p, n in names.items()}
        table: dict[str, str] = {}
        for path, name in names.items():
            for alias in (name, extra.get(path)):
                if alias:
                    table[alias] = path
                    table[alias.replace(".", "_")] = path
        if model == "transformer" and family == "flux" and transformer_config is not None:
            for name, parts in _flux_original_modules(transformer_config).items():
                if len(parts) == 1 and parts[0][1] is None:  # a plain rename
                    table[name] = table[name.replace(".", "_")] = parts[0][0]
                else:
                    entry = fused.setdefault(model, {})
                    entry[name] = entry[name.replace(".", "_")] = parts
        aliases[model], reference[model] = table, names
    return LayerNames(aliases, reference, original, fused)


def _flux_original_modules(config) -> dict[str, tuple[Part, ...]]:
    """Flux's original module names -> their parts, from the checkpoint converter's table (its
    row transforms take a fused weight's rows, so they take a LoRA up factor's rows too)."""
    modules: dict[str, list[Part]] = {}
    for key, (original, rows) in flux_weights._original_mapping(config).items():
        path = flux_weights.rename_key(key)
        if key.endswith(".weight") and path.endswith("/kernel"):
            modules.setdefault(original.removesuffix(".weight"), []).append(
                (path.removesuffix("/kernel"), rows))
    return {name: tuple(parts) for name, parts in modules.items()}


def _dotted(path: str) -> str:
    return ".".join(_INDEXED.sub(r"\1.\2", part) for part in path.split("/"))


def _diffusers_unet_name(path: str) -> str:
    """The diffusers module name of an sdjax U-Net layer path (checked by `diffusers_key`)."""
    return unet_weights.diffusers_key(path + "/kernel").removesuffix(".weight")


def _transformers_text_name(path: str) -> str:
    name = _dotted(path)
    return name if name == "text_projection" else "text_model.encoder." + name


def _ldm_names(config: UNetConfig) -> dict[str, str]:
    """diffusers U-Net module name -> the original LDM U-Net's, for `config`'s block layout."""
    names = dict(_LDM_FIXED)

    levels = config.num_levels
    index = 1
    for level in range(levels):
        for layer in range(config.layers[level]):
            _resnet(names, f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0")
            _attention(names, config, level, f"down_blocks.{level}.attentions.{layer}",
                       f"input_blocks.{index}.1")
            index += 1
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    _resnet(names, "mid_block.resnets.0", "middle_block.0")
    _attention(names, config, levels - 1, "mid_block.attentions.0", "middle_block.1")
    _resnet(names, "mid_block.resnets.1", "middle_block.2")
    index = 0
    for up in range(levels):
        level = levels - 1 - up
        for layer in range(config.layers[level] + 1):
            _resnet(names, f"up_blocks.{up}.resnets.{layer}", f"output_blocks.{index}.0")
            _attention(names, config, level, f"up_blocks.{up}.attentions.{layer}",
                       f"output_blocks.{index}.1")
            if layer == config.layers[level] and up < levels - 1:
                # The upsampler is the block's second module, or its third after an attention.
                position = 2 if _has_attention(config, level, up=True, up_index=up) else 1
                names[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{index}.{position}.conv"
            index += 1
    return {k: v for k, v in names.items() if v is not None}


def _resnet(names: dict, diffusers_prefix: str, ldm_prefix: str) -> None:
    for layer, original in _LDM_RESNET.items():
        names[f"{diffusers_prefix}.{layer}"] = f"{ldm_prefix}.{original}"


def _has_attention(config: UNetConfig, level: int, *, up: bool = False, up_index: int = 0) -> bool:
    if up:
        return config.up_block_types[up_index].startswith("CrossAttn")
    return config.down_block_types[level].startswith("CrossAttn")


def _attention(names: dict, config: UNetConfig, level: int, diffusers_prefix: str,
               ldm_prefix: str) -> None:
    """Inside a spatial transformer the original names are diffusers' own."""
    for layer in ("proj_in", "proj_out"):
        names[f"{diffusers_prefix}.{layer}"] = f"{ldm_prefix}.{layer}"
    for depth in range(max(config.transformer_depths)):
        block = f"transformer_blocks.{depth}"
        for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                      "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
            names[f"{diffusers_prefix}.{block}.{layer}"] = f"{ldm_prefix}.{block}.{layer}"
