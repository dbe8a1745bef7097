"""ControlNet checkpoints -> `ControlNetWeights` (config + params), and back to diffusers folders.

Read: a diffusers `ControlNetModel` folder (single, sharded or fp16-variant safetensors; also a
folder holding one as `controlnet/`), a diffusers-named `.safetensors` with its config.json beside
it, or a single file in the original (lllyasviel / cldm) layout, with or without the
`control_model.` prefix, in any float dtype. The original layout is the U-Net encoder's
(`single_file.UNET_ENCODER_RULES`) plus three ControlNet parts, after diffusers'
`convert_controlnet_checkpoint`:
  input_hint_block.{0, 2, ..., 2n}  the control image's convs (SiLU between them): the first is
                                    `controlnet_cond_embedding.conv_in`, the last `conv_out`, those
                                    between `blocks.0..n-2`; their count gives the embedding widths
  zero_convs.{i}.0                  `controlnet_down_blocks.{i}` (one per U-Net skip connection)
  middle_block_out.0                `controlnet_mid_block`
A single file's config comes from its shapes; what they cannot show (head counts, GroupNorm groups,
upcast attention) comes from `base`, the U-Net the ControlNet is used with, or else from the SD
families' conventions as for single-file U-Nets.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from sdjax.models.controlnet import (ControlNet, ControlNetConfig, config_mismatch,
                                     example_inputs, unet_mismatch)
from sdjax.models.unet import UNetConfig
from sdjax.weights.common import (DictSource, RenamedSource, SafetensorsFile, TensorSource,
                                  WeightsError, abstract_params, convert_state_dict)
from sdjax.weights.single_file import (NON_PARAMETER_KEYS, UNET_ENCODER_RULES, UNET_RESNET_NAMES,
                                       Part, read_header, short_list, unet_block_index,
                                       unet_encoder_config)
from sdjax.weights.unet import WEIGHTS_NAME, diffusers_key, open_weights, rename_key

CLASS_NAME = "ControlNetModel"
CONFIG_NAME = "config.json"
SUBFOLDER = "controlnet"  # where a diffusers pipeline folder keeps its ControlNet
CONTROL_PREFIX = "control_model."
# SD 1.x U-Nets (and so their ControlNets) cross-attend to CLIP ViT-L's 768-wide states.
SD1_CROSS_ATTENTION_DIM = 768

CONTROLNET_RULES = UNET_ENCODER_RULES + (
    (r"input_hint_block\.(?P<h>\d+)\.(?P<p>weight|bias)",
     (("controlnet_cond_embedding.{hint}.{p}", None),)),
    (r"zero_convs\.(?P<z>\d+)\.0\.(?P<p>weight|bias)", (("controlnet_down_blocks.{z}.{p}", None),)),
    (r"middle_block_out\.0\.(?P<p>weight|bias)", (("controlnet_mid_block.{p}", None),)),
)
# What a single file's shapes cannot show, taken from the U-Net the ControlNet is used with.
_FIELDS_FROM_BASE = ("attention_head_dim", "num_attention_heads", "upcast_attention",
                     "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "act_fn")
# The diffusers files of a model folder, replaced by `save_controlnet(..., overwrite=True)`.
_MODEL_FILES = re.compile(r"config\.json|diffusion_pytorch_model.*\.(?:safetensors|bin|json)")


@dataclasses.dataclass
class ControlNetWeights:
    """A ControlNet's config and params tree (host numpy arrays, aligned as other loaders')."""
    config: ControlNetConfig
    params: dict
    source: str = ""  # where it was loaded from (for messages and PNG metadata)


def load_controlnet(path: str | os.PathLike, *, base: Optional[UNetConfig] = None,
                    dtype: Any = None) -> ControlNetWeights:
    """Load a ControlNet (any of the forms in the module docstring). `base`: the U-Net config it
    will be used with, checked to fit (widths, layers, context width, SDXL's added embedding), and
    the source of what a single file's shapes cannot show. `dtype`: storage dtype (None: float32)."""
    from sdjax.weights.pretrained import storage_dtype  # here: pretrained may come to import us

    dtype = storage_dtype(dtype)
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_dir():
        folder = path
        if not (path / CONFIG_NAME).is_file() and (path / SUBFOLDER).is_dir():
            folder = path / SUBFOLDER
        config = _read_config(folder / CONFIG_NAME, base)
        source = open_weights(folder, what="ControlNet")
    else:
        shapes = {key: shape for key, (_, shape) in read_header(os.fspath(path)).items()}
        if any(key.startswith("controlnet_cond_embedding.") for key in shapes):
            config_path = path.parent / CONFIG_NAME
            if not config_path.is_file():
                raise WeightsError(f"{path}: diffusers-named ControlNet weights need the model's "
                                   f"{CONFIG_NAME} beside them ({config_path} is missing)")
            config, source = _read_config(config_path, base), SafetensorsFile(path)
        else:
            config, source = _read_original_file(os.fspath(path), shapes, base)
    if base is not None:
        _check_fits(config, base, source.name)
    params = convert_state_dict(source, rename_key, controlnet_shapes(config), what="ControlNet",
                                dtype=dtype)
    return ControlNetWeights(config, params, str(path))


def controlnet_shapes(config: ControlNetConfig) -> dict:
    """Shapes and dtypes of `ControlNet(config)`'s params (nothing allocated)."""
    return abstract_params(ControlNet(config), *example_inputs(config))


def _read_config(config_path: pathlib.Path, base: Optional[UNetConfig]) -> ControlNetConfig:
    if not config_path.is_file():
        raise WeightsError(f"{config_path}: no such file (expected a diffusers ControlNetModel "
                           f"folder, or one holding it as {SUBFOLDER}/)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{config_path}: unreadable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{config_path}: not a JSON object")
    class_name = raw.get("_class_name")
    if class_name != CLASS_NAME:
        raise WeightsError(f"{config_path}: _class_name is {class_name!r}: not supported (sdjax "
                           f"reads {CLASS_NAME}, the SD 1.x / 2.x / XL ControlNet)")
    try:
        return ControlNetConfig.from_diffusers(raw, **_attention(base))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_path}: {err}") from None


def _attention(base: Optional[UNetConfig]) -> dict:
    return {} if base is None else {"attention": base.attention}


# ---- The original layout ---------------------------------------------------------------------------
def _read_original_file(path: str, shapes: Mapping[str, tuple[int, ...]],
                        base: Optional[UNetConfig]) -> tuple[ControlNetConfig, TensorSource]:
    """(config, lazy diffusers-named source) of an original-layout ControlNet file."""
    drop = [re.compile(p) for p in NON_PARAMETER_KEYS]
    prefix = CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in shapes) else ""
    body = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)
            and not any(p.fullmatch(k) for p in drop)}
    if not any(k.startswith("input_hint_block.") for k in body):
        raise WeightsError(f"{path}: not a ControlNet: no 'input_hint_block.*' keys (with or "
                           f"without {CONTROL_PREFIX!r}){_looks_like(shapes)}")
    outside = [k for k in shapes
               if not k.startswith(prefix) and not any(p.fullmatch(k) for p in drop)]
    if outside:
        raise WeightsError(f"{path}: {len(outside)} keys outside {CONTROL_PREFIX!r}: "
                           + short_list(outside))
    hints = _hint_convs(body, path)
    config = _original_config(body, hints, path, base)

    names = {0: "conv_in", hints[-1]: "conv_out"}
    names.update({h: f"blocks.{h // 2 - 1}" for h in hints[1:-1]})
    block_index = unet_block_index(config["layers_per_block"])

    def derive(groups: dict) -> dict:
        hint = {"hint": names[int(groups["h"])]} if "h" in groups else {}
        return {**block_index(groups), **hint}

    part, unknown = Part(path, "ControlNet"), []
    for key, shape in body.items():
        if not part.add(CONTROLNET_RULES, key, prefix + key, shape, derive,
                        {"res": UNET_RESNET_NAMES}):
            unknown.append(prefix + key)
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} keys that are not part of a ControlNet: "
                           + short_list(unknown))
    try:
        controlnet_config = ControlNetConfig.from_diffusers(config, **_attention(base))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path}: ControlNet config inferred from the tensor shapes is refused: "
                           f"{err}") from None
    return controlnet_config, RenamedSource(SafetensorsFile(path), part.mapping)


def _hint_convs(body: Mapping[str, tuple[int, ...]], path: str) -> list[int]:
    """The indices of input_hint_block's convs: 0, 2, ..., an even count of them (conv_in, two per
    stage of the embedding, conv_out), each with a 4-D weight."""
    found = sorted({int(m.group(1)) for k in body
                    if (m := re.fullmatch(r"input_hint_block\.(\d+)\.(?:weight|bias)", k))})
    count = len(found)
    if count < 2 or count % 2 or found != list(range(0, 2 * count, 2)):
        raise WeightsError(f"{path}: input_hint_block convs at {found}: expected 0, 2, 4, ... (an "
                           f"even number: conv_in, two per stage, conv_out)")
    for h in found:
        shape = body.get(f"input_hint_block.{h}.weight")
        if shape is None or len(shape) != 4:
            raise WeightsError(f"{path}: input_hint_block.{h}.weight: expected a conv weight (4-D), "
                               f"got {shape}")
    return found


def _original_config(body: Mapping[str, tuple[int, ...]], hints: list[int], path: str,
                     base: Optional[UNetConfig]) -> dict:
    """A diffusers ControlNetModel config dict from the original keys' shapes (and `base`)."""
    to_k = next((s for k, s in body.items() if k.endswith(".attn2.to_k.weight")), None)
    if "label_emb.0.0.weight" in body:
        family = "sdxl"
    else:
        family = "sd1" if to_k is not None and to_k[1] == SD1_CROSS_ATTENTION_DIM else "sd2"
    pooled = base.text_embeds_dim if base is not None and base.text_embeds_dim else None
    try:
        encoder = unet_encoder_config(body, family, path, pooled_dim=pooled)
    except KeyError as err:
        raise WeightsError(f"{path}: cannot infer the ControlNet config: no tensor "
                           f"{err.args[0]!r}") from None
    widths = [body["input_hint_block.0.weight"][0]]
    # blocks.{2i+1} (the stride-2 conv of stage i) is input_hint_block.{4i+4}; it sets the width.
    widths += [body[f"input_hint_block.{4 * i + 4}.weight"][0]
               for i in range((len(hints) - 2) // 2)]
    config = {
        "_class_name": CLASS_NAME,
        **encoder,
        "mid_block_type": encoder["mid_block_type"] or "UNetMidBlock2D",
        "conditioning_channels": body["input_hint_block.0.weight"][1],
        "conditioning_embedding_out_channels": widths,
    }
    if base is not None:
        text_embeds = (config["projection_class_embeddings_input_dim"]
                       - 6 * config["addition_time_embed_dim"]
                       if config["addition_embed_type"] == "text_time" else 0)
        _raise_mismatch(unet_mismatch(base, block_out_channels=config["block_out_channels"],
                                      layers=config["layers_per_block"],
                                      cross_attention_dim=config["cross_attention_dim"],
                                      addition_embed_type=config["addition_embed_type"],
                                      text_embeds_dim=text_embeds), path)
        config.update({field: getattr(base, field) for field in _FIELDS_FROM_BASE})
        if not any(k.endswith(".proj_in.weight") for k in body):  # no attention to tell
            config["use_linear_projection"] = base.use_linear_projection
    return config


def _looks_like(shapes: Mapping[str, tuple[int, ...]]) -> str:
    if any(k.startswith("model.diffusion_model.") for k in shapes):
        return ("; it holds 'model.diffusion_model.*': a Stable Diffusion checkpoint (read it with "
                "load_pretrained)")
    if any(k.startswith(("output_blocks.", "time_embedding.", "up_blocks.")) for k in shapes):
        return "; it holds a U-Net's keys (output_blocks / up_blocks): a U-Net, not a ControlNet"
    return f" ({len(shapes)} keys, e.g. {short_list(list(shapes), 3)})"


# ---- Fit with the U-Net ----------------------------------------------------------------------------
def _check_fits(config: ControlNetConfig, base: UNetConfig, where: str) -> None:
    _raise_mismatch(config_mismatch(config, base), where)


def _raise_mismatch(mismatch, where: str) -> None:
    if mismatch is not None:
        what, ours, theirs = mismatch
        raise WeightsError(f"{where}: the ControlNet's {what} {ours!r} does not match the "
                           f"U-Net's {theirs!r}: they cannot work together")


# ---- Writing diffusers folders ---------------------------------------------------------------------
def save_controlnet(controlnet: ControlNetWeights, path: str | os.PathLike, *,
                    overwrite: bool = False) -> None:
    """Write a diffusers `ControlNetModel` folder (config.json, diffusion_pytorch_model.safetensors
    in the params' dtype) that diffusers' `from_pretrained` loads.

    The folder is written beside the target and renamed into place, so a crash leaves the old
    folder or the new one. A non-empty target is refused unless `overwrite`, which replaces the
    model files in it (config.json, diffusion_pytorch_model*) and leaves everything else."""
    from safetensors.numpy import save_file

    tensors = _reference_state_dict(controlnet)
    config_text = json.dumps(controlnet.config.to_diffusers(), indent=2, sort_keys=True) + "\n"
    target = pathlib.Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise WeightsError(f"{target}: exists and is not a folder (a diffusers ControlNet is a "
                           f"folder)")
    existing = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if existing and not overwrite:
        raise WeightsError(f"{target}: not empty (holds {short_list(existing, 5)}); pick an empty "
                           f"or new folder, or pass overwrite=True to replace the model files in it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(config_text)
        # mkdtemp's 0700 (and safetensors' 0600 file) would hide the model from other users.
        os.chmod(staging, 0o755)
        os.chmod(staging / WEIGHTS_NAME, 0o644)
        if not existing:
            os.replace(staging, target)  # a new or empty folder: one rename
            return
        previous = pathlib.Path(tempfile.mkdtemp(prefix=".sdjax-previous-", dir=target))
        # config.json leaves first and lands last: in between the folder holds no loadable model.
        old = sorted((p for p in target.iterdir() if _MODEL_FILES.fullmatch(p.name)),
                     key=lambda p: p.name != CONFIG_NAME)
        for file in old:
            file.rename(previous / file.name)
        os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)
        shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _reference_state_dict(controlnet: ControlNetWeights) -> dict[str, np.ndarray]:
    """The params under diffusers' names and PyTorch layouts (checked against the config first)."""
    config = controlnet.config
    flat = _flat(controlnet.params)
    # Each tensor keeps its dtype: the expected shapes take the params' dtypes.
    expected = {path: jax.ShapeDtypeStruct(s.shape, np.asarray(flat[path]).dtype if path in flat
                                           else s.dtype)
                for path, s in _flat(controlnet_shapes(config)).items()}
    checked = convert_state_dict(DictSource(flat, name=controlnet.source or "<ControlNet params>"),
                                 lambda key: key, _unflat(expected), what="ControlNet params",
                                 reference_layout=False)
    return {diffusers_key(path): _reference_layout(array, path, config)
            for path, array in _flat(checked).items()}


def _flat(tree: Mapping) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _reference_layout(array: np.ndarray, path: str, config: ControlNetConfig) -> np.ndarray:
    """sdjax layouts -> PyTorch's (the inverse of `common.to_sdjax_layout`): conv HWIO -> OIHW,
    dense (in, out) -> (out, in); SD 1.x's attention proj_in / proj_out are 1x1 convs there."""
    if not path.endswith("/kernel"):
        return np.ascontiguousarray(array)
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if re.search(r"/proj_(?:in|out)/kernel$", path) and not config.use_linear_projection:
        return np.ascontiguousarray(array.T[:, :, None, None])
    return np.ascontiguousarray(array.T)


# ---- A new ControlNet from a U-Net -----------------------------------------------------------------
def controlnet_from_unet(unet_config: UNetConfig, unet_params: Mapping[str, Any], *, seed: int = 0,
                         **control_fields: Any) -> ControlNetWeights:
    """`ControlNet.from_unet` (diffusers' `ControlNetModel.from_unet`: the encoder copied, the
    conditioning embedding fresh with its last conv at zero, the zero convs at zero) as
    ControlNetWeights, its params aligned as loaded ones; bad input is a WeightsError."""
    try:
        model, params = ControlNet.from_unet(unet_config, unet_params, seed=seed, **control_fields)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"controlnet_from_unet: {err}") from None
    shapes = controlnet_shapes(model.config)
    dtype = np.asarray(unet_params["conv_in"]["kernel"]).dtype
    params = convert_state_dict(DictSource(_flat(params), name="<U-Net params>"), lambda key: key,
                                shapes, what="ControlNet from U-Net", dtype=dtype,
                                reference_layout=False)
    return ControlNetWeights(model.config, params, "")


__all__ = ["ControlNetWeights", "load_controlnet", "save_controlnet", "controlnet_from_unet",
           "controlnet_shapes"]
