"""LoRA training as kohya's sd-scripts does it (`train_network.py --network_module=networks.lora`),
on the same loop, train step and objective as full fine-tuning.

The base models stay frozen param groups of the train state (no optimizer state, no EMA, not in
checkpoints); the LoRA factors are trainable groups beside them, one per adapted model
("lora_unet", "lora_text_encoder"[, "lora_text_encoder_2"]), each {layer path: {"down", "up"}} in
sdjax's layouts (`adapters.network`). Each step lays them out as the models' adapter collection
(`models.layers.ADAPTER_COLLECTION`, under params[ADAPTERS_KEY]) with scale alpha / rank and the
step's dropout masks, and runs the unchanged latent-diffusion objective on that params dict.

kohya's semantics (networks/lora.py, LoRAModule):
- targets: the U-Net's transformer blocks (every Linear and 1x1 conv in a Transformer2DModel: attn
  q/k/v/out, ff, proj_in/out) and the text encoders' CLIPAttention and CLIPMLP layers; with
  `conv_dim` also everything in the resnets and down/up-samplers, 3x3 convs at conv_dim/conv_alpha
  (LoCon: a 3x3 down, a 1x1 up), their Linear and 1x1 layers at network_dim/network_alpha;
- alpha 0 means alpha = rank; init: down as torch's Linear/Conv2d default (kaiming-uniform,
  a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))), up zeros, so a new LoRA leaves the model as it is;
- dropout (neuron): each element of x.down zeroed with probability p, the rest scaled by 1/(1-p);
  rank_dropout: a mask per (example, rank), scale * 1/(1-p); module_dropout: a whole module skipped
  for the step with probability p (one draw per module per step, for the whole batch).

The flow families' transformers (SD3 / SD3.5 MMDiT, Flux) train LoRAs as diffusers'
`train_dreambooth_lora_sd3.py` / `train_dreambooth_lora_flux.py` do: the group "lora_transformer"
(`train_unet` adapts the denoiser, U-Net or transformer), targets as those scripts' peft
`target_modules` (module names ending in them), the CLIP encoders' attention projections when
the text encoders train, `init="gaussian"` (peft's: down N(0, 1/rank^2)), and the export is
diffusers' LoRA file (`transformer.<module>.lora_A.weight` / `lora_B.weight` and peft's
`lora_adapter_metadata`), which `StableDiffusion3Pipeline` / `FluxPipeline.load_lora_weights` read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax.adapters import network as network_lib
from sdjax.adapters.names import layer_names
from sdjax.models.layers import ADAPTERS_KEY
from sdjax.models.unet import UNetConfig
from sdjax.training.step import WrappingTask

GROUP_PREFIX = "lora_"
# kohya's default targets, as regular expressions searched in the diffusers / transformers module
# name of each layer (`adapters.names`): Transformer2DModel; ResnetBlock2D, Downsample2D and
# Upsample2D (with conv_dim); CLIPAttention and CLIPMLP.
UNET_TRANSFORMER_TARGETS = (r"(^|\.)attentions\.\d+\.",)
UNET_CONV_TARGETS = (r"(^|\.)resnets\.\d+\.", r"(^|\.)(downsamplers|upsamplers)\.\d+\.")
TEXT_ENCODER_TARGETS = (r"^text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.",)
# diffusers' default targets of the flow families, peft-matched (a module whose name ends in one):
# train_dreambooth_lora_sd3.py (joint attention, image and context streams) and
# train_dreambooth_lora_flux.py (also the feed-forwards of the double blocks; `attn.to_q/k/v` match
# the single blocks' too), and both scripts' CLIP text-encoder targets.
_ATTENTION = r"(^|\.)attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
TRANSFORMER_TARGETS = {"sd3": (_ATTENTION,),
                       "flux": (_ATTENTION, r"(^|\.)(ff|ff_context)\.net\.(0\.proj|2)$")}
FLOW_TEXT_ENCODER_TARGETS = (r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",)
TRANSFORMER = "transformer"
INITS = ("kohya", "gaussian")
# kohya's `ss_base_model_version` of each family.
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# "LoRA": the factors' initial values are numpy's stream [seed, this]; a step's dropout masks come
# from fold_in(step key, this), the objective keeping the step key itself, so that a LoRA whose
# factors are zero reproduces the base model's loss for the same key.
_STREAM = 0x4C6F5241


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """kohya's network settings: `--network_dim --network_alpha --network_dropout` (here `dropout`),
    `--network_args conv_dim= conv_alpha= rank_dropout= module_dropout=`, and which models are
    adapted (`--network_train_unet_only` is train_text_encoder=False, `--network_train_text_
    encoder_only` train_unet=False; for SD3 / Flux `train_unet` means the transformer).
    `target_modules`: regular expressions replacing the default targets, searched in each layer's
    diffusers / transformers module name. `init`: the down factors' draw, "kohya" (kaiming-uniform)
    or "gaussian" (peft's N(0, 1/rank^2), diffusers' training scripts)."""
    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    target_modules: tuple[str, ...] = ()
    train_unet: bool = True
    train_text_encoder: bool = True
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init: str = "kohya"

    def __post_init__(self):
        for field in ("network_dim", "conv_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"lora.{field} must be an integer >= 0, got {value!r}")
        if self.network_dim == 0:
            raise ValueError("lora.network_dim must be > 0 (the rank of every Linear / 1x1 LoRA)")
        for field in ("network_alpha", "conv_alpha"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"lora.{field} must be a finite number >= 0 (0: alpha = rank), "
                                 f"got {value!r}")
        for field in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"lora.{field} must be in [0, 1), got {value!r}")
        for pattern in self.target_modules:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"lora.target_modules: {pattern!r} is not a regular expression "
                                 f"({err})") from None
        if self.init not in INITS:
            raise ValueError(f"lora.init {self.init!r} is not one of {INITS}")
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("lora.train_unet and lora.train_text_encoder are both off: nothing "
                             "to train")

    def network_args(self) -> dict[str, str]:
        """The settings kohya takes as `--network_args` (its `ss_network_args`), as strings."""
        args = {}
        if self.conv_dim:
            args.update(conv_dim=str(self.conv_dim), conv_alpha=str(self.conv_alpha))
        if self.rank_dropout:
            args["rank_dropout"] = str(self.rank_dropout)
        if self.module_dropout:
            args["module_dropout"] = str(self.module_dropout)
        if self.target_modules:
            args["target_modules"] = ",".join(self.target_modules)
        return args


def lora_config(fields: Mapping[str, Any], exclude: Sequence[str] = ()) -> LoRAConfig:
    """A LoRAConfig from a config's `lora` fields (lists as tuples), leaving out `exclude`."""
    known = {f.name for f in dataclasses.fields(LoRAConfig)}
    unknown = sorted(set(fields) - known - set(exclude))
    if unknown:
        raise ValueError(f"lora: unknown settings {unknown}; known: {sorted(known)}")
    return LoRAConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in fields.items() if k in known})


@dataclasses.dataclass(frozen=True)
class Module:
    """One adapted layer: params[model][path]'s kernel gets down . up * alpha / rank."""
    model: str
    path: str
    down_shape: tuple[int, ...]   # (in, r) or (kh, kw, in, r)
    up_shape: tuple[int, int]     # (r, out)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down_shape[-1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))


def group_name(model: str) -> str:
    """The train state's param group holding `model`'s LoRA factors."""
    return GROUP_PREFIX + model


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: static data of a jitted task
class Network:
    """The adapted layers of a model and the dropouts they train with."""
    modules: tuple[Module, ...]
    config: LoRAConfig

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.model for m in self.modules))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(group_name(m) for m in self.models)

    def init(self, seed: int) -> dict[str, dict]:
        """{group: {layer path: {"down", "up"}}} as kohya (or peft, `init="gaussian"`)
        initialises them (float32, host)."""
        rng = np.random.default_rng([seed, _STREAM])
        flat: dict[str, dict] = {}
        for module in self.modules:
            if self.config.init == "gaussian":
                down = rng.normal(0.0, 1.0 / module.rank, module.down_shape).astype(np.float32)
            else:
                bound = 1.0 / math.sqrt(int(np.prod(module.down_shape[:-1])))
                down = rng.uniform(-bound, bound, module.down_shape).astype(np.float32)
            up = np.zeros(module.up_shape, np.float32)
            flat.setdefault(group_name(module.model), {})[module.keys] = {"down": down, "up": up}
        return {group: traverse_util.unflatten_dict(tree) for group, tree in flat.items()}

    def factors(self, params: Mapping[str, Any], module: Module) -> dict:
        tree = params[group_name(module.model)]
        for key in module.keys:
            tree = tree[key]
        return tree

    def variables(self, params: Mapping[str, Any], key: Optional[jax.Array] = None,
                  batch_size: Optional[int] = None) -> dict[str, dict]:
        """{model: its adapter collection} for params[ADAPTERS_KEY], from the LoRA groups of
        `params`. With `key` (training) the configured dropouts are drawn from it; without,
        the LoRA as it is used for inference."""
        c = self.config
        flat: dict[str, dict] = {}
        for index, module in enumerate(self.modules):
            factors = self.factors(params, module)
            scale = jnp.full((module.rank,), module.scale, jnp.float32)
            leaves = {"down": factors["down"], "up": factors["up"]}
            if key is not None:
                layer_key = jax.random.fold_in(key, index)
                rank_key, module_key, neuron_key = jax.random.split(layer_key, 3)
                if c.rank_dropout:
                    keep = jax.random.uniform(rank_key, (batch_size, module.rank)) > c.rank_dropout
                    scale = scale * keep * (1.0 / (1.0 - c.rank_dropout))
                if c.module_dropout:
                    scale = scale * (jax.random.uniform(module_key) >= c.module_dropout)
                if c.dropout:
                    leaves["dropout_key"] = jax.random.key_data(neuron_key)
                    leaves["dropout_rate"] = jnp.float32(c.dropout)
            leaves["scale"] = scale
            flat.setdefault(module.model, {}).update(
                {module.keys + (name,): value for name, value in leaves.items()})
        return {model: traverse_util.unflatten_dict(tree) for model, tree in flat.items()}

    def adapter(self, params: Mapping[str, Any], name: str, metadata: Optional[dict] = None
                ) -> network_lib.Adapter:
        """The trained factors (host arrays) as an `adapters.network.Adapter`, for the formats."""
        modules: dict[str, dict] = {}
        for module in self.modules:
            factors = self.factors(params, module)
            modules.setdefault(module.model, {})[module.path] = network_lib.LowRank(
                down=np.asarray(factors["down"], np.float32),
                up=np.asarray(factors["up"], np.float32), alpha=float(module.alpha))
        return network_lib.Adapter(name=name, modules=modules, metadata=dict(metadata or {}))

    def inference_params(self, params: Mapping[str, Any]) -> dict:
        """A `Pretrained.params`-shaped dict (base models + params[ADAPTERS_KEY]) that samplers
        run: the train state's params with the LoRA applied at run time."""
        groups = set(self.groups)
        base = {name: value for name, value in params.items() if name not in groups}
        return {**base, ADAPTERS_KEY: self.variables(params)}


def make_network(params: Mapping[str, Any], unet_config: Optional[UNetConfig], config: LoRAConfig,
                 family: str = "") -> Network:
    """The layers of `params` (a `Pretrained.params` of `family`) that `config` adapts, in a fixed
    order: the U-Net's or, for SD3 / Flux, the transformer's, then the CLIP text encoders'."""
    names = layer_names(params, unet_config, family)
    flow = family in TRANSFORMER_TARGETS
    denoiser = TRANSFORMER if flow else network_lib.UNET
    models = ([denoiser] if config.train_unet else []) + (
        [m for m in network_lib.TEXT_ENCODERS if m in names.reference]
        if config.train_text_encoder else [])
    modules = []
    for model in models:
        if config.target_modules:
            patterns = config.target_modules
        elif model == TRANSFORMER:
            patterns = TRANSFORMER_TARGETS[family]
        elif model == network_lib.UNET:
            patterns = UNET_TRANSFORMER_TARGETS + (UNET_CONV_TARGETS if config.conv_dim else ())
        else:
            patterns = FLOW_TEXT_ENCODER_TARGETS if flow else TEXT_ENCODER_TARGETS
        kernels = network_lib.kernel_shapes(params, model)
        for path, reference in sorted(names.reference[model].items()):
            if not any(re.search(p, reference) for p in patterns):
                continue
            shape = kernels[path]
            spatial = len(shape) == 4 and shape[:2] != (1, 1)
            if spatial and not config.conv_dim:
                raise ValueError(f"lora.target_modules selects {model} layer {reference} "
                                 f"({shape[0]}x{shape[1]} conv), but lora.conv_dim is 0")
            rank, alpha = ((config.conv_dim, config.conv_alpha) if spatial
                           else (config.network_dim, config.network_alpha))
            modules.append(Module(model=model, path=path, down_shape=shape[:-1] + (rank,),
                                  up_shape=(rank, shape[-1]), alpha=float(alpha or rank)))
    if not modules:
        raise ValueError(f"lora: no layer of {', '.join(models)} matches "
                         f"{list(config.target_modules) or 'the default targets'}")
    return Network(modules=tuple(modules), config=config)


@dataclasses.dataclass(frozen=True, eq=False)
class LoRATask(WrappingTask):
    """`task` (the latent-diffusion objective) run with `network`'s LoRA on its frozen base."""
    task: Any
    network: Network

    def loss(self, params: dict, batch: dict, key: jax.Array):
        adapters = self.network.variables(params, jax.random.fold_in(key, _STREAM),
                                          batch["input_ids"].shape[0])
        groups = set(self.network.groups)
        base = {name: value for name, value in params.items() if name not in groups}
        return self.task.loss({**base, ADAPTERS_KEY: adapters}, batch, key)


def kohya_metadata(network: Network, *, family: str, prediction_type: str,
                   groups: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, str]:
    """kohya's `ss_*` metadata of a LoRA trained with `network` and the optimizer `groups`
    ({group: ParamGroup}); `extra` holds the run's own keys (steps, seed, dataset, ...). Values
    are strings, as kohya writes them; unknown ones (None) are left out."""
    c = network.config
    unet = groups.get(group_name(network_lib.UNET))
    text = groups.get(group_name(network_lib.TEXT_ENCODERS[0]))
    version = BASE_MODEL_VERSIONS[family]
    if prediction_type == "v_prediction" and family != "sdxl":
        version += "_v"
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": c.network_dim,
        "ss_network_alpha": c.network_alpha,
        "ss_network_dropout": c.dropout or None,
        "ss_network_args": json.dumps(c.network_args()) if c.network_args() else None,
        "ss_base_model_version": version,
        "ss_v2": family == "sd2",
        "ss_learning_rate": (unet or text).lr,
        "ss_unet_lr": unet.lr if unet else None,
        "ss_text_encoder_lr": text.lr if text else None,
        "ss_lr_scheduler": (unet or text).schedule,
        "ss_lr_warmup_steps": (unet or text).warmup_steps,
        "ss_optimizer": "optax.adamw" + "(" + ",".join(
            f"{k}={getattr(unet or text, k)}" for k in ("weight_decay", "b1", "b2", "eps")) + ")",
        **extra,
    }
    return {k: str(v) for k, v in metadata.items() if v is not None}


# The native sdjax adapter file beside the kohya one.
NATIVE_SUFFIX = ".sdjax.safetensors"


def export_files(network: Network, params: Mapping[str, Any], model, directory: str, name: str,
                 metadata: Optional[dict] = None) -> dict[str, str]:
    """Write the LoRA of `params` (host arrays) trained on `model` (its `Pretrained`) into
    `directory`: for the U-Net families `<name>.safetensors` (kohya's format, what the WebUI,
    ComfyUI and diffusers' `load_lora_weights` read) and `<name>.sdjax.safetensors` (sdjax's native
    adapter file), returning {"kohya": path, "sdjax": path}; for SD3 / Flux `<name>.safetensors`
    in diffusers' format (`export_diffusers_file`), returning {"diffusers": path}."""
    from sdjax.adapters import formats

    os.makedirs(directory, exist_ok=True)
    if model.family in TRANSFORMER_TARGETS:
        path = os.path.join(directory, name + ".safetensors")
        export_diffusers_file(network, params, model, path, metadata)
        return {"diffusers": path}
    adapter = network.adapter(params, name, metadata)
    paths = {"kohya": os.path.join(directory, name + ".safetensors"),
             "sdjax": os.path.join(directory, name + NATIVE_SUFFIX)}
    for format, path in paths.items():
        formats.save_adapter(path, adapter, model, format=format, metadata=metadata)
    return paths


def export_diffusers_file(network: Network, params: Mapping[str, Any], model, path: str,
                          metadata: Optional[dict] = None) -> str:
    """The LoRA of `params` (host arrays) as diffusers' pipelines save one (`save_lora_weights`):
    `<model>.<diffusers / transformers module name>.lora_A.weight` (rank, in) and `.lora_B.weight`
    (out, rank), PyTorch layouts, float32, and peft's config of each model under the metadata key
    `lora_adapter_metadata` (`<model>.r`, `<model>.lora_alpha`, `<model>.target_modules`, and
    `rank_pattern` / `alpha_pattern` for the modules that differ), so that diffusers' and sdjax's
    readers both apply alpha / rank. `metadata`: more string entries (the run's)."""
    import safetensors.numpy

    from sdjax.adapters.formats import PEFT_METADATA_KEY
    from sdjax.runs import write_atomically

    names = layer_names(model.params, model.unet_config, model.family)
    tensors, configs = {}, {}
    for module in network.modules:
        factors = network.factors(params, module)
        down, up = np.asarray(factors["down"], np.float32), np.asarray(factors["up"], np.float32)
        if down.ndim == 4:  # a conv: lora_A is a conv of the layer's kernel, lora_B a 1x1
            lora_a, lora_b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
        else:
            lora_a, lora_b = down.T, up.T
        reference = names.reference[module.model][module.path]
        key = f"{module.model}.{reference}"
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(lora_b)
        # peft matches a target by the end of a module's name: without `text_model.`, the names
        # fit transformers 4's CLIPTextModel and transformers 5's, which drops that level.
        configs.setdefault(module.model, []).append(
            (reference.removeprefix("text_model."), module.rank, module.alpha))
    peft = {}
    for model_name, modules in configs.items():
        # peft's config: the most common rank and alpha, patterns for the others (diffusers' way).
        rank = max(set(m[1] for m in modules), key=[m[1] for m in modules].count)
        alpha = max(set(m[2] for m in modules), key=[m[2] for m in modules].count)
        peft.update({f"{model_name}.r": rank, f"{model_name}.lora_alpha": alpha,
                     f"{model_name}.target_modules": sorted(m[0] for m in modules),
                     f"{model_name}.rank_pattern": {m[0]: m[1] for m in modules if m[1] != rank},
                     f"{model_name}.alpha_pattern": {m[0]: m[2] for m in modules if m[2] != alpha}})
    header = {**(metadata or {}), "format": "pt",
              PEFT_METADATA_KEY: json.dumps(peft, indent=2, sort_keys=True)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, safetensors.numpy.save(tensors, metadata=header))
    return path


__all__ = ["LoRAConfig", "LoRATask", "Module", "Network", "export_diffusers_file", "export_files",
           "group_name", "kohya_metadata", "lora_config", "make_network"]
