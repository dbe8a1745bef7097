"""`load_pretrained`: one door for every checkpoint people have.

- a diffusers folder (model_index.json + unet/ or transformer/, vae/, text_encoder/[, _2/, _3/],
  tokenizer/...): SD 1.x/2.x/XL, SD3/3.5 and Flux.1,
- a single-file checkpoint in the original layouts (`.safetensors`; SD3.5 and Flux files through
  `weights.flow_single_file`, with `components=` for the parts a file does not bundle),
- a native sdjax folder (sdjax.json + orbax params), written by `save_pretrained`,
and optionally a standalone VAE (folder or file) that replaces the checkpoint's own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Optional

import numpy as np

from sdjax.models.clip import CLIPTextConfig
from sdjax.models.flux import FluxConfig
from sdjax.models.mmdit import MMDiTConfig
from sdjax.models.t5 import T5Config
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig
from sdjax.text.conditioning import TEXT_ENCODER_NAMES
from sdjax.text.t5_tokenizer import T5Tokenizer
from sdjax.text.tokenizer import CLIPTokenizer
from sdjax.weights import clip as clip_weights
from sdjax.weights import flux as flux_weights
from sdjax.weights import mmdit as mmdit_weights
from sdjax.weights import t5 as t5_weights
from sdjax.weights import unet as unet_weights
from sdjax.weights import vae as vae_weights
from sdjax.weights.common import WeightsError, save_params_tree, write_native_folder

NATIVE_MANIFEST = "sdjax.json"
NATIVE_FORMAT_VERSION = 1
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")
# The scheduler of the flow families when a checkpoint carries none (single files).
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# The flow families' transformers by diffusers class name.
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclasses.dataclass
class Pretrained:
    """Everything a latent-diffusion checkpoint holds, as configs + one params pytree.

    `params` is {"unet": ..., "vae": ..., "text_encoder": ...[, "text_encoder_2": ...]} so the whole
    model can be passed to jitted code as one argument. `text_configs[i]` and `tokenizers[i]` belong to
    `params[TEXT_ENCODER_NAMES[i]]`. The flow families (sd3, flux) have "transformer" instead of
    "unet" (`unet_config` None, `transformer_config` set) and a T5 encoder last among the text
    encoders (SD3: CLIP-L, CLIP-G[, T5]; Flux: CLIP-L, T5).
    """
    family: str  # "sd1" | "sd2" | "sdxl" | "sd3" | "flux"
    unet_config: Optional[UNetConfig]
    vae_config: VAEConfig
    text_configs: tuple  # CLIPTextConfig / T5Config
    tokenizers: tuple  # CLIPTokenizer / T5Tokenizer
    params: dict
    scheduler_config: dict
    source: str = ""
    transformer_config: Any = None  # MMDiTConfig | FluxConfig

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return TEXT_ENCODER_NAMES[:len(self.text_configs)]


def load_pretrained(path: str | os.PathLike, vae: Optional[str | os.PathLike] = None,
                    dtype: Any = None, *, prediction_type: Optional[str] = None,
                    extract_ema: bool = False,
                    components: Optional[str | os.PathLike] = None) -> Pretrained:
    """Load a checkpoint from a diffusers folder, a single `.safetensors` file or a native folder.

    Args:
      path: the checkpoint.
      vae: optional standalone VAE (diffusers folder, or single file in diffusers or original layout)
        that replaces the checkpoint's VAE.
      dtype: storage dtype of the returned params (e.g. jnp.bfloat16); None keeps float32.
      prediction_type: override the scheduler's prediction type ("epsilon", "v_prediction", "sample");
        single files can't say which they were trained for.
      extract_ema: for single files that carry an EMA copy of the U-Net, use it.
      components: for SD3 / Flux single files, a diffusers folder of the same family whose text
        encoders, tokenizers, VAE and scheduler fill in what the file does not bundle (Flux files
        hold the transformer alone).
    """
    dtype = storage_dtype(dtype)
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / NATIVE_MANIFEST).is_file():
            model = _load_native(path, dtype)
        elif (path / "model_index.json").is_file():
            model = _load_diffusers_folder(path, dtype)
        elif (path / clip_weights.NATIVE_CLIP_MANIFEST).is_file():
            raise WeightsError(
                f"{path}: an sdjax CLIP model ({clip_weights.NATIVE_CLIP_MANIFEST}), not a "
                f"latent-diffusion checkpoint: read it with evaluation.metrics.load_clip_scorer "
                f"(or --clip_model) or weights.clip.load_clip_native")
        else:
            raise WeightsError(
                f"{path}: not a checkpoint folder: found neither model_index.json (diffusers) "
                f"nor {NATIVE_MANIFEST} (sdjax)")
    else:
        from sdjax.weights import flow_single_file

        if flow_single_file.is_flow_file(path):
            model = flow_single_file.load_flow_single_file(path, dtype, components=components)
            components = None
        else:
            model = _load_single_file(path, dtype, prediction_type=prediction_type,
                                      extract_ema=extract_ema)
    if components is not None:  # a whole checkpoint: taking parts from elsewhere would be silent
        raise WeightsError(f"{path}: components= completes SD3 / Flux single files; this is a "
                           f"whole {model.family} checkpoint (for another VAE, pass vae=)")
    if prediction_type is not None:
        model.scheduler_config = {**model.scheduler_config, "prediction_type": prediction_type}
    if vae is not None:
        vae_config, model.params["vae"] = load_vae(
            vae, dtype, scaling_factor=model.vae_config.scaling_factor)
        if vae_config.latent_channels != model.vae_config.latent_channels:
            raise WeightsError(f"{vae}: a VAE with {vae_config.latent_channels} latent channels "
                               f"cannot replace this model's ({model.vae_config.latent_channels})")
        if path.is_file() or pathlib.Path(vae).is_file():
            # A single file cannot say its latent scaling: keep the model's.
            vae_config = dataclasses.replace(vae_config,
                                             scaling_factor=model.vae_config.scaling_factor,
                                             shift_factor=model.vae_config.shift_factor)
        model.vae_config = vae_config
    return model


def storage_dtype(dtype: Any) -> np.dtype:
    """The params' storage dtype: None is float32; anything else must name a floating dtype."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 and the float8 types by name

    if dtype is None:
        return np.dtype(np.float32)
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not (np.issubdtype(resolved, np.floating) or resolved.name == "bfloat16"):
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype (float32, bfloat16, float16)")
    return resolved


def load_vae(path: str | os.PathLike, dtype: Any = None, *,
             scaling_factor: float = 0.18215) -> tuple[VAEConfig, dict]:
    """A standalone VAE: a diffusers `AutoencoderKL` folder, or a single file (either layout).

    A single file can't say its latent scaling factor: it is taken from the model it joins."""
    from sdjax.weights.single_file import read_vae_file

    path = pathlib.Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such VAE file or folder")
    if path.is_dir():
        return vae_weights.load_vae_folder(path, dtype=dtype)
    config_dict, source = read_vae_file(path, scaling_factor=scaling_factor)
    config = VAEConfig.from_diffusers(config_dict)
    return config, vae_weights.vae_params(source, config, dtype=dtype)


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None


def family_of(text_configs: tuple[CLIPTextConfig, ...]) -> str:
    """sd1 / sd2 / sdxl, as told by the text encoders (their count and activation)."""
    if len(text_configs) == 2:
        return "sdxl"
    return "sd2" if text_configs[0].hidden_act == "gelu" else "sd1"


def _load_diffusers_folder(path: pathlib.Path, dtype) -> Pretrained:
    index = _read_json(path / "model_index.json")
    if "transformer" in index:
        return load_flow_folder(path, dtype)
    for part in ("unet", "vae", "text_encoder"):
        if part not in index:
            raise WeightsError(f"{path / 'model_index.json'}: no {part!r} component listed")
        if not (path / part).is_dir():
            raise WeightsError(f"{path}: model_index.json lists {part!r} but {path / part} is missing")
    unet_config, unet_params = unet_weights.load_unet_folder(path / "unet", dtype=dtype)
    vae_config, vae_params = vae_weights.load_vae_folder(path / "vae", dtype=dtype)
    params = {"unet": unet_params, "vae": vae_params}
    text_configs, tokenizers = [], []
    for encoder_name, tokenizer_name in zip(TEXT_ENCODER_NAMES, TOKENIZER_NAMES):
        if index.get(encoder_name) in (None, [None, None]):
            continue
        config, params[encoder_name] = clip_weights.load_clip_text_folder(path / encoder_name, dtype=dtype)
        text_configs.append(config)
        tokenizer_dir = path / tokenizer_name
        tokenizers.append(CLIPTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir.is_dir()
                          else CLIPTokenizer.default())
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    return Pretrained(family=family_of(tuple(text_configs)), unet_config=unet_config,
                      vae_config=vae_config, text_configs=tuple(text_configs),
                      tokenizers=tuple(tokenizers), params=params,
                      scheduler_config=scheduler_config, source=str(path))


def load_flow_folder(path: pathlib.Path, dtype) -> Pretrained:
    """An SD3 / SD3.5 / Flux.1 diffusers folder: transformer/, vae/, text_encoder{,_2,_3}/,
    tokenizer{,_2,_3}/, scheduler/ (SD3 folders saved without T5 list text_encoder_3 as null)."""
    index = _read_json(path / "model_index.json")
    names = [n for n in TEXT_ENCODER_NAMES if index.get(n) not in (None, [None, None])]
    parts = flow_folder_parts(path, ("transformer", "vae", "scheduler", *names), dtype)
    family, transformer_config, transformer = parts["transformer"]
    params = {"transformer": transformer, "vae": parts["vae"][1]}
    for name in names:
        params[name] = parts[name][1]
    return Pretrained(family=family, unet_config=None, vae_config=parts["vae"][0],
                      text_configs=tuple(parts[n][0] for n in names),
                      tokenizers=tuple(parts[n][2] for n in names), params=params,
                      scheduler_config=parts["scheduler"], source=str(path),
                      transformer_config=transformer_config)


def flow_family(path: pathlib.Path) -> str:
    """sd3 / flux, from a flow folder's transformer/config.json (no weights read)."""
    config_file = path / "transformer" / "config.json"
    kind = _read_json(config_file).get("_class_name")
    if kind not in TRANSFORMER_FAMILIES:
        raise WeightsError(f"{config_file}: transformer class {kind!r} is not one sdjax runs "
                           f"({', '.join(TRANSFORMER_FAMILIES)})")
    return TRANSFORMER_FAMILIES[kind]


def flow_folder_parts(path: pathlib.Path, names, dtype) -> dict:
    """Components of a flow diffusers folder by name: "transformer" -> (family, config, params),
    "vae" -> (config, params), a text encoder -> (config, params, tokenizer), "tokenizer_N" -> a
    tokenizer alone, "scheduler" -> its config (FlowMatchEuler's defaults when absent)."""
    out = {}
    for name in names:
        folder = path / name
        if name == "scheduler":
            config_file = folder / "scheduler_config.json"
            out[name] = _read_json(config_file) if config_file.is_file() else {}
            out[name].setdefault("_class_name", FLOW_SCHEDULER)
            continue
        if not folder.is_dir():
            raise WeightsError(f"{path}: no {name}/ folder")
        if name == "transformer":
            family = flow_family(path)
            loader = mmdit_weights.load_mmdit if family == "sd3" else flux_weights.load_flux
            out[name] = (family, *loader(folder, dtype=dtype))
        elif name == "vae":
            out[name] = vae_weights.load_vae_folder(folder, dtype=dtype)
        elif name.startswith("tokenizer"):
            t5 = (folder / "spiece.model").is_file() or _read_json_if(
                folder / "tokenizer_config.json").get("tokenizer_class", "").startswith("T5")
            out[name] = (T5Tokenizer if t5 else CLIPTokenizer).from_pretrained(folder)
        else:
            tokenizer_folder = path / name.replace("text_encoder", "tokenizer")
            if _read_json(folder / "config.json").get("model_type") == "t5":
                config, params = t5_weights.load_t5(folder, dtype=dtype)
                tokenizer = T5Tokenizer.from_pretrained(tokenizer_folder)
            else:
                config, params = clip_weights.load_clip_text_folder(folder, dtype=dtype)
                tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
            out[name] = (config, params, tokenizer)
    return out


def _read_json_if(path: pathlib.Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def _load_single_file(path: pathlib.Path, dtype, *, prediction_type, extract_ema) -> Pretrained:
    from sdjax.weights.single_file import read_single_file

    checkpoint = read_single_file(path, prediction_type=prediction_type, extract_ema=extract_ema)
    unet_dict, unet_source = checkpoint.parts["unet"]
    vae_dict, vae_source = checkpoint.parts["vae"]
    unet_config = UNetConfig.from_diffusers(unet_dict)
    vae_config = VAEConfig.from_diffusers(vae_dict)
    params = {"unet": unet_weights.unet_params(unet_source, unet_config, dtype=dtype),
              "vae": vae_weights.vae_params(vae_source, vae_config, dtype=dtype)}
    text_configs, tokenizers = [], []
    for encoder_name in TEXT_ENCODER_NAMES:
        if encoder_name not in checkpoint.parts:
            continue
        config_dict, source = checkpoint.parts[encoder_name]
        config = CLIPTextConfig.from_transformers(config_dict)
        params[encoder_name] = clip_weights.clip_text_params(source, config, dtype=dtype)
        text_configs.append(config)
        # OpenCLIP's tokenizer pads with "!" (id 0); OpenAI CLIP's with <|endoftext|>.
        tokenizers.append(CLIPTokenizer.default(pad_token="!" if config.hidden_act == "gelu"
                                                else "<|endoftext|>"))
    return Pretrained(family=checkpoint.family, unet_config=unet_config, vae_config=vae_config,
                      text_configs=tuple(text_configs), tokenizers=tuple(tokenizers), params=params,
                      scheduler_config=dict(checkpoint.scheduler),
                      source=str(path))


def save_pretrained(model: Pretrained, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write the native format into the folder `path`: sdjax.json (configs), params/ (orbax),
    tokenizer folders. Nothing else in the folder is touched; a non-empty folder that holds no
    sdjax model is refused unless `overwrite` (see `common.write_native_folder`)."""
    manifest = {
        "format": "sdjax", "version": NATIVE_FORMAT_VERSION, "family": model.family,
        "vae": model.vae_config.to_dict(),
        "text_encoders": [c.to_dict() for c in model.text_configs],
        "text_encoder_kinds": [_text_kind(c) for c in model.text_configs],
        "scheduler": model.scheduler_config,
    }
    if model.unet_config is not None:
        manifest["unet"] = model.unet_config.to_dict()
    if model.transformer_config is not None:
        manifest["transformer"] = model.transformer_config.to_dict()

    def write_entries(staging: pathlib.Path) -> None:
        save_params_tree(staging / "params", model.params)
        for tokenizer, name in zip(model.tokenizers, TOKENIZER_NAMES):
            tokenizer.save_pretrained(staging / name)

    write_native_folder(path, NATIVE_MANIFEST, manifest, write_entries,
                        ("params", *TOKENIZER_NAMES), overwrite=overwrite)


def _load_native(path: pathlib.Path, dtype) -> Pretrained:
    import orbax.checkpoint as ocp

    manifest = _read_json(path / NATIVE_MANIFEST)
    if manifest.get("format") != "sdjax" or manifest.get("version") != NATIVE_FORMAT_VERSION:
        raise WeightsError(f"{path / NATIVE_MANIFEST}: not an sdjax v{NATIVE_FORMAT_VERSION} "
                           f"manifest (format={manifest.get('format')!r}, "
                           f"version={manifest.get('version')!r})")
    family = manifest["family"]
    unet_config = UNetConfig.from_dict(manifest["unet"]) if "unet" in manifest else None
    transformer_config = None
    if "transformer" in manifest:
        transformer_config = (MMDiTConfig if family == "sd3" else FluxConfig).from_dict(
            manifest["transformer"])
    vae_config = VAEConfig.from_dict(manifest["vae"])
    kinds = manifest.get("text_encoder_kinds", ["clip"] * len(manifest["text_encoders"]))
    text_configs = tuple((T5Config if kind == "t5" else CLIPTextConfig).from_dict(c)
                         for kind, c in zip(kinds, manifest["text_encoders"]))
    try:
        # orbax takes absolute paths only.
        params = ocp.StandardCheckpointer().restore(path.absolute() / "params")
    except Exception as err:  # noqa: BLE001 - orbax raises many types for a damaged folder
        raise WeightsError(f"{path / 'params'}: cannot restore params ({err})") from None
    expected = {"vae": vae_weights.vae_shapes(vae_config)}
    if unet_config is not None:
        expected["unet"] = unet_weights.unet_shapes(unet_config)
    if transformer_config is not None:
        expected["transformer"] = (mmdit_weights.mmdit_shapes if family == "sd3"
                                   else flux_weights.flux_shapes)(transformer_config)
    for name, config in zip(TEXT_ENCODER_NAMES, text_configs):
        expected[name] = (t5_weights.t5_shapes(config) if isinstance(config, T5Config)
                          else clip_weights.clip_text_shapes(config))
    params = _check_native_params(path / "params", params, expected, dtype)
    tokenizers = tuple((T5Tokenizer if isinstance(config, T5Config) else CLIPTokenizer)
                       .from_pretrained(path / name)
                       for name, config in zip(TOKENIZER_NAMES, text_configs))
    return Pretrained(family=family, unet_config=unet_config, vae_config=vae_config,
                      text_configs=text_configs, tokenizers=tokenizers, params=params,
                      scheduler_config=manifest.get("scheduler", {}), source=str(path),
                      transformer_config=transformer_config)


def _text_kind(config) -> str:
    return "t5" if isinstance(config, T5Config) else "clip"


def _check_native_params(where: pathlib.Path, params: dict, expected: dict, dtype) -> dict:
    """The restored params must be exactly the trees the manifest's configs describe."""
    from flax import traverse_util

    from sdjax.weights.common import DictSource, convert_state_dict

    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise WeightsError(f"{where}: params for unknown parts {unknown}")
    out = {}
    for name, shapes in expected.items():
        if name not in params:
            raise WeightsError(f"{where}: no params for {name}")
        flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params[name]).items()}
        out[name] = convert_state_dict(DictSource(flat, name=str(where)), lambda key: key, shapes,
                                       what=name, dtype=dtype, reference_layout=False)
    return out
