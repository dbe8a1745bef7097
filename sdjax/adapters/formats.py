"""Adapter files: `load_adapter` reads the LoRA / LyCORIS files people have into an
`adapters.network.Adapter`, without torch; `save_adapter` writes kohya files or sdjax's own.

Read (`.safetensors` files, and diffusers LoRA folders):
- kohya / WebUI: `lora_unet_*`, `lora_te_*` (SD 1.x/2.x), `lora_te1_*` / `lora_te2_*` (SDXL), each
  module's name flattened with underscores in diffusers or original-LDM spelling (adapters.names);
  for SD3 / Flux `lora_unet_` (and `lora_transformer_`) name the transformer's modules, Flux's in
  the original model's spelling too (`lora_unet_double_blocks_0_img_attn_qkv`: a fused module's
  up factor split by output rows between the sdjax layers, its down shared);
  `lora_down.weight`, `lora_up.weight` and `alpha` per module, each module's own alpha honoured (a
  missing one means alpha = rank); LoCon (conv factors) also on layers sdjax holds as dense
  (SD 1.x `proj_in`); LyCORIS LoHa (`hada_*`), LoKr (`lokr_*`), LoCon's Tucker core (`lora_mid`)
  and full differences (`diff`, `diff_b`) as the WebUI applies them (adapters.lycoris).
- diffusers / peft: `lora_A` / `lora_B` (and the older `lora.down`, `lora_linear_layer.down`,
  `processor.to_q_lora.down` spellings) under `unet.`, `transformer.` (SD3 / Flux),
  `text_encoder.`, `text_encoder_2.` or no prefix, or ComfyUI's `diffusion_model.` (the
  denoiser); alphas from the `lora_adapter_metadata` JSON peft's config leaves there (`r`,
  `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`); without it alpha = rank, as diffusers.
- sdjax's own file (metadata `format` = "sdjax-adapter"): sdjax paths and layouts, read bit-exact.
Refused: pickles (with the command that converts them), DoRA (its magnitude rescales the merged
weight by its norm, which no delta expresses), LoRAs of a T5 encoder (Flux's `lora_te2_`). A key no layer takes is an error naming the file
and key (strict=False: one warning, the rest loads); so is a file with no adapter keys at all, and
(`network.check_targets`) an adapter made for another architecture.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Mapping, Optional

import numpy as np
import safetensors.numpy
from absl import logging

from sdjax.adapters import lycoris
from sdjax.adapters.names import LayerNames, Part, layer_names
from sdjax.adapters.network import (MODEL_NAMES, TRANSFORMER, UNET, Adapter, AdapterError,
                                    DenseDelta, Factor, LowRank, check_targets, fit_down,
                                    kernel_shapes)
from sdjax.runs import write_atomically
from sdjax.weights.common import SafetensorsFile, WeightsError, to_sdjax_layout
from sdjax.weights.pretrained import Pretrained
from sdjax.weights.single_file import PICKLE_EXTENSIONS, pickle_refusal_message

SUFFIX = ".safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes in a folder
PEFT_METADATA_KEY = "lora_adapter_metadata"
NATIVE_FORMAT, NATIVE_VERSION = "sdjax-adapter", 1
FORMAT_KEY, VERSION_KEY = "format", "sdjax_adapter_version"
FORMATS = ("kohya", "sdjax")
# Metadata that describes a file's format rather than its adapter: never copied to another file.
_FORMAT_METADATA = (FORMAT_KEY, VERSION_KEY, PEFT_METADATA_KEY)

# `lora_unet_` and `diffusion_model.` name the denoiser: the U-Net, or the SD3 / Flux transformer.
_KOHYA_PREFIXES = (("lora_unet_", UNET), ("lora_transformer_", TRANSFORMER),
                   ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))
_MODEL_PREFIXES = (("unet.", UNET), ("transformer.", TRANSFORMER), ("diffusion_model.", UNET),
                   ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"))
# What follows a module's name in a key -> the part of the module it holds.
_PARTS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    **{part: part for part in lycoris.LOHA_PARTS + lycoris.LOKR_PARTS + lycoris.FULL_PARTS
       + lycoris.COMMON_PARTS},
}
_DORA = ("dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")
# Adapter parts sdjax does not apply: their keys are never placed.
_UNSUPPORTED = {"lora_B.bias": "a LoRA bias (peft lora_bias=True)",
                "w_norm": "a LyCORIS norm-layer weight", "b_norm": "a LyCORIS norm-layer bias",
                "oft_blocks": "OFT", "oft_diag": "OFT", "on_input": "IA3"}
_SUFFIXES = sorted([*_PARTS, *_DORA, *_UNSUPPORTED], key=len, reverse=True)
# diffusers' attention processors of old: `attn1.processor.to_q_lora.down.weight`,
# `self_attn.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                        r"(?P<part>down|up)\.weight")
_PROCESSOR_LAYERS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                              "to_out": "out_proj"}}
_NATIVE_LEAVES = ("down", "up", "alpha", "delta", "bias")
_SHOWN = 5  # keys listed in a message


@dataclasses.dataclass(frozen=True)
class _Key:
    """One tensor of a reference-format file: its module (model None: an unprefixed peft key) and
    which part of it the tensor holds; `kohya` for `lora_unet_`-style keys."""
    key: str
    model: Optional[str]
    module: str
    part: str
    kohya: bool


# --- reading ---------------------------------------------------------------------------------------

def load_adapter(path: str | os.PathLike, model: Pretrained, *, strict: bool = True,
                 name: Optional[str] = None) -> Adapter:
    """The adapter in `path` (a file, or a diffusers LoRA folder) for `model`'s layers, named
    `name` or the file's stem (the folder's name), carrying the file's metadata."""
    file, default_name = _adapter_file(path)
    try:
        source = SafetensorsFile(file)
    except WeightsError as err:
        raise AdapterError(str(err)) from None
    metadata = source.metadata()
    if metadata.get(FORMAT_KEY) == NATIVE_FORMAT:
        modules, unplaced = _read_native(source, metadata)
        metadata = {k: v for k, v in metadata.items() if k not in (FORMAT_KEY, VERSION_KEY)}
    else:
        modules, unplaced = _read_reference(source, metadata, model)
    if unplaced:
        shown = ", ".join(f"{key} ({why})" for key, why in unplaced[:_SHOWN])
        more = f", ... ({len(unplaced)} in all)" if len(unplaced) > _SHOWN else ""
        if strict or not any(modules.values()):
            hint = "; strict=False loads the rest" if strict and any(modules.values()) else ""
            raise AdapterError(f"{file}: {len(unplaced)} keys fit no layer of this "
                               f"{model.family} model: {shown}{more}{hint}")
        logging.warning("%s: skipped %d keys that fit no layer of this %s model: %s%s", file,
                        len(unplaced), model.family, shown, more)
    adapter = Adapter(name=name or default_name, modules=modules, metadata=metadata,
                      source=str(file))
    check_targets(adapter, model.params)
    return adapter


def _adapter_file(path: str | os.PathLike) -> tuple[pathlib.Path, str]:
    """The safetensors file `path` names (for a folder: the diffusers weights file in it, or its
    only safetensors file) and the adapter's default name; pickles are refused."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise AdapterError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
        if (path / DIFFUSERS_WEIGHTS).is_file():
            return path / DIFFUSERS_WEIGHTS, path.name
        if len(files) == 1:
            return files[0], path.name
        pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_EXTENSIONS)
        if not files and pickles:
            _refuse_pickle(pickles[0])
        raise AdapterError(
            f"{path}: {'no' if not files else 'more than one'} adapter file in the folder "
            f"(looked for {DIFFUSERS_WEIGHTS}, else a single {SUFFIX} file"
            f"{': found ' + ', '.join(p.name for p in files) if files else ''}); name the file")
    if path.suffix.lower() in PICKLE_EXTENSIONS:
        _refuse_pickle(path)
    return path, path.stem


def _refuse_pickle(path: pathlib.Path):
    raise AdapterError(pickle_refusal_message(str(path), f"a {path.suffix} adapter is a pickle"))


def _read_native(source: SafetensorsFile, metadata: Mapping[str, str]):
    """sdjax's own file: `{model}/{layer path}/{down, up, alpha | delta[, bias]}`, as stored."""
    version = metadata.get(VERSION_KEY, "")
    if not version.isdigit() or int(version) > NATIVE_VERSION:
        raise AdapterError(f"{source.name}: sdjax adapter format version {version!r}; this sdjax "
                           f"reads versions up to {NATIVE_VERSION}")
    groups: dict[tuple[str, str], dict[str, str]] = {}
    unplaced = []
    for key in source:
        model, _, rest = key.partition("/")
        path, _, leaf = rest.rpartition("/")
        if model not in MODEL_NAMES or not path or leaf not in _NATIVE_LEAVES:
            unplaced.append((key, f"not a {{{'|'.join(MODEL_NAMES)}}}/<layer>/"
                                  f"{{{'|'.join(_NATIVE_LEAVES)}}} key"))
            continue
        groups.setdefault((model, path), {})[leaf] = key
    modules: dict[str, dict] = {}
    for (model, path), keys in sorted(groups.items()):
        leaves = {leaf: source[key] for leaf, key in keys.items()}
        if set(keys) == {"down", "up", "alpha"}:
            factor = LowRank(leaves["down"], leaves["up"], float(leaves["alpha"]))
        elif set(keys) in ({"delta"}, {"delta", "bias"}):
            factor = DenseDelta(leaves["delta"], leaves.get("bias"))
        else:
            unplaced += [(key, f"a layer needs down, up and alpha, or delta[, bias]; it has "
                               f"{', '.join(sorted(keys))}") for key in keys.values()]
            continue
        modules.setdefault(model, {})[path] = factor
    return modules, unplaced


def _read_reference(source: SafetensorsFile, metadata: Mapping[str, str], model: Pretrained):
    """kohya / WebUI / LyCORIS / diffusers / peft keys -> {model: {layer path: factor}} and the
    keys no layer takes, with why."""
    names = layer_names(model.params, model.unet_config, model.family,
                        transformer_config=model.transformer_config)
    # (model, the module's parts: one whole layer, or the layers a fused module splits into)
    groups: dict[tuple[str, tuple[Part, ...]], dict[str, _Key]] = {}
    unplaced, recognised = [], 0
    for key in source:
        parsed = _parse_key(key)
        if parsed is None:
            unplaced.append((key, "not an adapter tensor"))
            continue
        recognised += parsed.part not in lycoris.COMMON_PARTS
        if parsed.part in _DORA:
            raise AdapterError(
                f"{source.name}: {key}: DoRA is not supported: its magnitude vector rescales each "
                f"merged weight by that weight's norm, which no delta added to the layer expresses "
                f"(merge it into the checkpoint with the tool that trained it)")
        if parsed.part in _UNSUPPORTED:
            unplaced.append((key, f"{_UNSUPPORTED[parsed.part]}, which sdjax does not apply"))
            continue
        target, parts = _find_layer(names, parsed, model)
        if parts is None:
            unplaced.append((key, target))
            continue
        group = groups.setdefault((target, parts), {})
        if parsed.part in group:
            raise AdapterError(f"{source.name}: {key} and {group[parsed.part].key} both give the "
                               f"{parsed.part} of {target} layer {_layers(parts)}")
        group[parsed.part] = parsed
    if not recognised:
        keys = list(source)
        found = (f"its {len(keys)} tensors are named like {', '.join(keys[:3])}" if keys
                 else "it holds no tensors")
        raise AdapterError(
            f"{source.name}: no adapter tensors (LoRA lora_down/lora_up or lora_A/lora_B, "
            f"LyCORIS hada_/lokr_/diff): {found}")
    configs = _peft_configs(source.name, metadata)
    kernels = {target: kernel_shapes(model.params, target) for target, _ in groups}
    modules: dict[str, dict] = {}
    for (target, layers), keys in sorted(groups.items(),
                                         key=lambda group: (group[0][0], _layers(group[0][1]))):
        shape = _module_kernel_shape(kernels[target], layers)
        try:
            split = _split(_factor(source, keys, shape, configs), layers, shape)
        except _Unplaced as why:
            unplaced += [(k.key, str(why)) for k in keys.values()]
            continue
        for path, part in split:
            if path in modules.get(target, {}):
                raise AdapterError(f"{source.name}: {next(iter(keys.values())).key} adapts "
                                   f"{target} layer {path}, which other keys of the file adapt "
                                   f"too")
            modules.setdefault(target, {})[path] = part
    return modules, unplaced


def _layers(parts: tuple[Part, ...]) -> str:
    return " + ".join(path for path, _ in parts)


def _module_kernel_shape(kernels: Mapping[str, tuple[int, ...]], parts: tuple[Part, ...]
                         ) -> tuple[int, ...]:
    """The kernel shape of a file's module: its layer's, or for a fused module (dense layers
    with one input) the parts' outputs side by side."""
    shapes = [kernels[path] for path, _ in parts]
    if len(parts) == 1:
        return shapes[0]
    return shapes[0][:-1] + (sum(shape[-1] for shape in shapes),)


def _split(factor: Factor, parts: tuple[Part, ...], shape: tuple[int, ...]
           ) -> list[tuple[str, Factor]]:
    """A module's factor as its layers' factors: each part takes its rows of the module's output
    (of the up factor, or of a dense delta and its bias); a low-rank down is shared. `shape`: the
    module's kernel shape (`_module_kernel_shape`)."""
    if len(parts) == 1 and parts[0][1] is None:
        return [(parts[0][0], factor)]
    if isinstance(factor, LowRank):
        fits = factor.up.shape[-1] == shape[-1] and factor.down.shape[:-1] == shape[:-1]
        got = f"down {factor.down.shape}, up {factor.up.shape}"
    else:
        fits = factor.delta.shape == shape
        got = f"delta {factor.delta.shape}"
    if not fits:
        raise _Unplaced(f"the layers {_layers(parts)} make a kernel of {shape} (sdjax layout), "
                        f"the module's factors are {got}")
    # The parts' rows are a PyTorch weight's (output first); sdjax's up and delta hold it last.
    take = lambda rows, array: np.ascontiguousarray(rows(array.T).T)
    if isinstance(factor, LowRank):
        return [(path, LowRank(factor.down, take(rows, factor.up), factor.alpha))
                for path, rows in parts]
    return [(path, DenseDelta(take(rows, factor.delta),
                              None if factor.bias is None else rows(factor.bias)))
            for path, rows in parts]


def _parse_key(key: str) -> Optional[_Key]:
    """The module and part a key names, or None when it names no adapter part."""
    match = _PROCESSOR.fullmatch(key)
    if match:
        model, module = _split_model(match["module"])
        kind = "unet" if model in (None, UNET) and not module.endswith("self_attn") else "text"
        module = f"{module}.{_PROCESSOR_LAYERS[kind][match['proj']]}"
        return _Key(key, model, module, match["part"], kohya=False)
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            module = key[:-len(suffix) - 1]
            part = _PARTS.get(suffix, suffix)
            for prefix, model in _KOHYA_PREFIXES:
                if module.startswith(prefix):
                    return _Key(key, model, module[len(prefix):], part, kohya=True)
            model, module = _split_model(module)
            return _Key(key, model, module, part, kohya=False)
    return None


def _is_adapter_key(key: str) -> bool:
    """Whether a key holds an adapter's own tensor (`alpha` or `bias` alone could be anything's)."""
    parsed = _parse_key(key)
    return parsed is not None and parsed.part not in lycoris.COMMON_PARTS


def _split_model(module: str) -> tuple[Optional[str], str]:
    for prefix, model in _MODEL_PREFIXES:
        if module.startswith(prefix):
            return model, module[len(prefix):]
    return None, module


def _find_layer(names: LayerNames, parsed: _Key, model: Pretrained
                ) -> tuple[str, Optional[tuple[Part, ...]]]:
    """(model name, the parts of the module a parsed key names: one whole layer, or the layers a
    fused module splits into); (why not, None) when no layer has its name."""
    wanted = parsed.model
    if wanted == UNET and UNET not in model.params and TRANSFORMER in model.params:
        wanted = TRANSFORMER  # `lora_unet_`, `diffusion_model.`: the denoiser, whatever it is
    if wanted is not None and wanted not in model.params:
        return f"this model has no {wanted}", None
    if wanted is not None and wanted not in names.aliases:
        return (f"{wanted} of this {model.family} model is a T5 encoder, which sdjax applies no "
                f"adapter to"), None
    candidates = [wanted] if wanted else [m for m in MODEL_NAMES if m in model.params]
    for candidate in candidates:
        path = names.find(candidate, parsed.module)
        if path is not None:
            return candidate, ((path, None),)
        parts = names.parts(candidate, parsed.module)
        if parts is not None:
            return candidate, parts
    return f"no layer of {wanted or 'this model'} is named {parsed.module}", None


class _Unplaced(Exception):
    """A module whose keys no layer can take, with why."""


def _factor(source: SafetensorsFile, parts: Mapping[str, _Key], kernel_shape: tuple[int, ...],
            configs: Mapping[Optional[str], dict]):
    """One module's factor in sdjax layout, from its tensors in the file (float32)."""
    w = {part: np.asarray(source[k.key], np.float32) for part, k in parts.items()}
    kind = lycoris.kind(w)
    if kind is None:
        raise _Unplaced(f"its parts ({', '.join(sorted(w))}) make no LoRA, LoHa, LoKr or full "
                        f"difference")
    stray = set(w) - _kind_parts(kind)
    if stray:
        raise _Unplaced(f"{', '.join(sorted(stray))} beside a {kind} module")
    if kind == "lora" and not {"mid", "bias"} & set(w):
        first = next(iter(parts.values()))
        rank = int(w["down"].shape[0])
        if "scale" in w:
            alpha = lycoris.scalar(w["scale"]) * rank
        elif "alpha" in w:
            alpha = lycoris.scalar(w["alpha"])
        elif first.kohya:
            alpha = float(rank)
        else:
            alpha = _peft_alpha(source.name, configs, first, rank)
        return LowRank(_down_layout(w["down"], kernel_shape), _up_layout(w["up"]), alpha)
    update, dim = lycoris.update(kind, w)
    delta = _delta_layout(update * np.float32(lycoris.scale(w, dim)), kernel_shape)
    return DenseDelta(delta, w.get("diff_b"))


def _kind_parts(kind: str) -> set[str]:
    own = {"lora": ("down", "up", "mid"), "loha": lycoris.LOHA_PARTS, "lokr": lycoris.LOKR_PARTS,
           "full": lycoris.FULL_PARTS}[kind]
    return set(own) | set(lycoris.COMMON_PARTS)


def _torch_shape(kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel's PyTorch weight shape: dense (in, out) -> (out, in); conv HWIO -> OIHW."""
    if len(kernel_shape) == 2:
        return kernel_shape[::-1]
    kh, kw, cin, cout = kernel_shape
    return cout, cin, kh, kw


def _down_layout(down: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """(r, in) or (r, in, kh, kw) -> (in, r) or (kh, kw, in, r); a 1x1-conv down on a layer sdjax
    holds as dense (SD 1.x proj_in) -> (in, r). Sizes are checked later (check_targets)."""
    if down.ndim == 2:
        return down.T
    if down.ndim == 4 and len(kernel_shape) == 2 and down.shape[2:] == (1, 1):
        return down[:, :, 0, 0].T
    if down.ndim == 4:
        return down.transpose(2, 3, 1, 0)
    raise _Unplaced(f"a LoRA down of shape {down.shape}")


def _up_layout(up: np.ndarray) -> np.ndarray:
    """(out, r) or (out, r, 1, 1) -> (r, out)."""
    if up.ndim == 2:
        return up.T
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        return up[:, :, 0, 0].T
    raise _Unplaced(f"a LoRA up of shape {up.shape} (a LoRA up is a matrix or a 1x1 conv)")


def _delta_layout(update: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """A dense update in PyTorch layout -> the kernel's sdjax layout; one whose size differs from
    the kernel's is left as it is, for check_targets to report."""
    if update.size != int(np.prod(kernel_shape)):
        return update
    return to_sdjax_layout(update.reshape(_torch_shape(kernel_shape)), kernel_shape, "kernel")


# --- peft metadata ---------------------------------------------------------------------------------

def _peft_configs(file: str, metadata: Mapping[str, str]) -> dict[Optional[str], dict]:
    """The peft LoraConfig fields of `lora_adapter_metadata`, by model: diffusers' pipelines prefix
    them (`unet.lora_alpha`), a model's own `save_lora_adapter` does not (key None)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{file}: metadata {PEFT_METADATA_KEY} is not JSON ({err})") from None
    if not isinstance(fields, dict):
        raise AdapterError(f"{file}: metadata {PEFT_METADATA_KEY} is not a JSON object")
    configs: dict[Optional[str], dict] = {}
    for key, value in fields.items():
        model, field = _split_model(key)
        configs.setdefault(model, {})[field] = value
    return configs


def _peft_alpha(file: str, configs: Mapping[Optional[str], dict], key: _Key, rank: int) -> float:
    """The alpha peft gives a module: `alpha_pattern`'s first pattern matching its name, else
    `lora_alpha` (peft's default 8); times sqrt(r) under rsLoRA, whose scale is alpha / sqrt(r).
    Without a config, alpha = rank (diffusers' scale 1)."""
    config = configs.get(key.model, configs.get(None))
    if config is None:
        return float(rank)
    try:
        r = _pattern_value(config.get("rank_pattern") or {}, key.module, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, key.module,
                               config.get("lora_alpha", 8))
    except re.error as err:
        raise AdapterError(f"{file}: {PEFT_METADATA_KEY}: a pattern is not a regular expression "
                           f"({err})") from None
    if int(r) != rank:
        raise AdapterError(f"{file}: {key.key}: rank {rank}, but {PEFT_METADATA_KEY} gives "
                           f"{key.module} rank {r}")
    return float(alpha) * (np.sqrt(rank) if config.get("use_rslora") else 1.0)


def _pattern_value(patterns: Mapping[str, float], module: str, default):
    """peft's `get_pattern_key`: the value of the first pattern that matches the end of `module`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# --- writing ---------------------------------------------------------------------------------------

def save_adapter(path: str | os.PathLike, adapter: Adapter, model: Pretrained, *,
                 format: str = "kohya", metadata: Optional[Mapping[str, str]] = None) -> pathlib.Path:
    """Write `adapter` (made for `model`) to the `.safetensors` file `path`, atomically.

    format "kohya": `lora_unet_*` / `lora_te_*` (`lora_te1_` / `lora_te2_` for SDXL) keys with
    `lora_down.weight`, `lora_up.weight` and a per-module `alpha`, in PyTorch layouts, as kohya's
    sd-scripts writes them (the WebUI, ComfyUI and diffusers read them); low-rank factors of the
    U-Net families only (an SD3 / Flux transformer's LoRA: format "sdjax").
    format "sdjax": sdjax paths and layouts, any factor, read back bit-exact.
    The file's metadata is the adapter's, updated with `metadata` (strings, e.g. kohya's `ss_*`).
    An existing file is replaced only if it is an adapter file."""
    if format not in FORMATS:
        raise ValueError(f"adapter format {format!r} is not one of {', '.join(FORMATS)}")
    path = pathlib.Path(path).expanduser()
    if path.suffix.lower() != SUFFIX:
        raise AdapterError(f"{path}: adapter files are written as {SUFFIX}")
    check_targets(adapter, model.params)
    if not any(adapter.modules.values()):
        raise AdapterError(f"{path}: adapter {adapter.name!r} adapts no layer; nothing to save")
    merged = {k: v for k, v in {**adapter.metadata, **(metadata or {})}.items()
              if k not in _FORMAT_METADATA}
    for key, value in merged.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise AdapterError(f"{path}: metadata {key!r} is a {type(value).__name__}; safetensors "
                               f"metadata holds strings (json.dumps it)")
    if format == "kohya":
        tensors = _kohya_tensors(adapter, model)
    else:
        tensors = _native_tensors(adapter)
        merged.update({FORMAT_KEY: NATIVE_FORMAT, VERSION_KEY: str(NATIVE_VERSION)})
    data = safetensors.numpy.save(tensors, metadata=merged)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)
    return path


def _native_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    tensors = {}
    for model, layers in adapter.modules.items():
        for path, factor in layers.items():
            key = f"{model}/{path}/"
            if isinstance(factor, LowRank):
                tensors.update({key + "down": factor.down, key + "up": factor.up,
                                key + "alpha": np.asarray(factor.alpha, np.float64)})
            else:
                tensors[key + "delta"] = factor.delta
                if factor.bias is not None:
                    tensors[key + "bias"] = factor.bias
    return {k: np.asarray(v, order="C") for k, v in tensors.items()}


def _kohya_tensors(adapter: Adapter, model: Pretrained) -> dict[str, np.ndarray]:
    if TRANSFORMER in adapter.modules:
        raise AdapterError(f"{adapter.source or adapter.name}: sdjax writes no kohya file for "
                           f"the {model.family} transformer; save it with format='sdjax'")
    names = layer_names(model.params, model.unet_config)
    prefixes = {"unet": "lora_unet_", "text_encoder_2": "lora_te2_",
                "text_encoder": "lora_te_" if len(model.text_encoder_names) == 1 else "lora_te1_"}
    tensors = {}
    for target, layers in adapter.modules.items():
        kernels = kernel_shapes(model.params, target)
        for path, factor in sorted(layers.items()):
            if not isinstance(factor, LowRank):
                raise AdapterError(
                    f"{adapter.source or adapter.name}: {target} {path} is a dense delta (LoHa, "
                    f"LoKr or a full difference): a kohya file holds low-rank factors only; save "
                    f"it with format='sdjax'")
            shape = kernels[path]
            down = fit_down(np.asarray(factor.down), shape, factor.rank)
            up = np.asarray(factor.up).T
            if len(shape) == 4:
                down, up = down.transpose(3, 2, 0, 1), up[:, :, None, None]
            elif _reference_is_conv(model, target, path):
                down, up = down.T[:, :, None, None], up[:, :, None, None]
            else:
                down = down.T
            # kohya's SDXL scripts name the U-Net's layers as the original (LDM) model does.
            key = prefixes[target] + names.kohya_name(target, path,
                                                      original=model.family == "sdxl")
            tensors.update({key + ".lora_down.weight": _kohya_dtype(down),
                            key + ".lora_up.weight": _kohya_dtype(up),
                            key + ".alpha": np.asarray(factor.alpha, np.float32)})
    return tensors


def _reference_is_conv(model: Pretrained, target: str, path: str) -> bool:
    """SD 1.x's spatial transformers project in and out with 1x1 convs, which sdjax holds as
    dense layers: their factors are written as 1x1-conv kernels, as the reference model has them."""
    return (target == UNET and not model.unet_config.use_linear_projection
            and path.rsplit("/", 1)[-1] in ("proj_in", "proj_out"))


def _kohya_dtype(x: np.ndarray) -> np.ndarray:
    """Factors keep their own float dtype, float64 becoming float32 (kohya writes fp32/fp16/bf16)."""
    x = np.asarray(x, order="C")
    return x.astype(np.float32) if x.dtype == np.float64 else x


def _check_replaceable(path: pathlib.Path) -> None:
    """Refuse to replace a folder or a file that is not an adapter (a checkpoint named by mistake)."""
    if path.is_dir():
        raise AdapterError(f"{path}: is a folder; an adapter is written as one {SUFFIX} file")
    if not path.exists():
        return
    try:
        existing = SafetensorsFile(path)
        ours = existing.metadata().get(FORMAT_KEY) == NATIVE_FORMAT
        is_adapter = ours or any(_is_adapter_key(key) for key in existing)
    except WeightsError:
        is_adapter = False
    if not is_adapter:
        raise AdapterError(f"{path}: exists and is not an adapter file; not replacing it (pick "
                           f"another path or remove it)")
