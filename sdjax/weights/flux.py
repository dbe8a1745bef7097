"""Flux.1 transformer weights -> sdjax `FluxTransformer` params: diffusers `FluxTransformer2DModel`
folders, and Black Forest Labs' original layout (the `flux1-dev.safetensors` people download:
`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, ...).

The original layout is read as a lazy view under diffusers' names (fused q/k/v and linear1 split on
read, the final adaLN's shift/scale halves swapped), following diffusers'
`convert_flux_transformer_checkpoint_to_diffusers`, then converted like a diffusers file. Files that
carry the `model.diffusion_model.` prefix are handed over with it stripped by the caller.
"""
from __future__ import annotations

import pathlib
import re
from typing import Callable, Iterable, Optional

import numpy as np
from flax import traverse_util

from sdjax.models.flux import MLP_RATIO, FluxConfig, FluxTransformer, example_inputs
from sdjax.weights.common import (RenamedSource, TensorSource, WeightsError, abstract_params,
                                  convert_state_dict, inverse_key, read_model_config,
                                  regex_renamer, short_list)
from sdjax.weights.unet import open_weights

CLASS_NAME = "FluxTransformer2DModel"
WHAT = "Flux transformer"

# ---- diffusers names ------------------------------------------------------------------------------
# diffusers name -> sdjax path, first full match wins; list indices then become `_i` suffixes
# (transformer_blocks.0.attn.norm_q.weight -> transformer_blocks_0/attn/norm_q/scale).
_table = regex_renamer((
    (r"(.+)\.to_out\.0\.weight", r"\1.to_out.kernel"),
    (r"(.+)\.to_out\.0\.bias", r"\1.to_out.bias"),
    # FeedForward: net = [GELU (with its proj), Dropout, Linear].
    (r"(.+)\.net\.0\.proj\.weight", r"\1.proj.kernel"),
    (r"(.+)\.net\.0\.proj\.bias", r"\1.proj.bias"),
    (r"(.+)\.net\.2\.weight", r"\1.out.kernel"),
    (r"(.+)\.net\.2\.bias", r"\1.out.bias"),
    (r"(.+\.norm_(?:added_)?[qk])\.weight", r"\1.scale"),
    (r"(.+)\.weight", r"\1.kernel"),
))
_INDEX = re.compile(r"[./](\d+)(?=[./]|$)")


def rename_key(key: str) -> Optional[str]:
    """The sdjax params path of a diffusers `FluxTransformer2DModel` state-dict key."""
    path = _table(key)
    return None if path is None else _INDEX.sub(r"_\1", path).replace(".", "/")


# sdjax module paths -> diffusers': list indices, and the single-entry lists around linears.
_DIFFUSERS_MODULES = ((re.compile(r"(^|\.)((?:single_)?transformer_blocks)_(\d+)\."), r"\1\2.\3."),
                      (re.compile(r"\.to_out$"), ".to_out.0"),
                      (re.compile(r"(^|\.)(ff|ff_context)\.proj$"), r"\1\2.net.0.proj"),
                      (re.compile(r"(^|\.)(ff|ff_context)\.out$"), r"\1\2.net.2"))


def diffusers_key(path: str) -> str:
    """The diffusers state-dict key of an sdjax Flux params path, the inverse of `rename_key`
    (checked against it): `transformer_blocks_0/ff/proj/kernel` ->
    `transformer_blocks.0.ff.net.0.proj.weight`."""
    return inverse_key(path, rename_key, _DIFFUSERS_MODULES, "diffusers Flux")


def flux_shapes(config: FluxConfig) -> dict:
    """Shapes and dtypes of `FluxTransformer(config)`'s params (nothing allocated)."""
    return abstract_params(FluxTransformer(config), *example_inputs(config))


def flux_params(source: TensorSource, config: FluxConfig, dtype=None) -> dict:
    """Params of `FluxTransformer(config)` from a diffusers-named state dict. `dtype` casts every
    tensor (default: float32, the module's param_dtype; float8 files are upcast)."""
    return convert_state_dict(source, rename_key, flux_shapes(config), what=WHAT, dtype=dtype)


def load_flux(folder, dtype=None) -> tuple[FluxConfig, dict]:
    """(config, params) from a diffusers `FluxTransformer2DModel` folder (a pipeline's
    `transformer/`): config.json and safetensors weights, single or sharded, plain or fp16."""
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    raw = read_model_config(folder, CLASS_NAME)
    try:
        config = FluxConfig.from_diffusers(raw)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return config, flux_params(open_weights(folder, "transformer"), config, dtype=dtype)


# ---- Black Forest Labs' original layout -----------------------------------------------------------
ORIGINAL_PREFIX = "model.diffusion_model."
# Keys every original Flux.1 file has and no other family's does (HunyuanVideo's double blocks
# fuse `img_attn_qkv` with an underscore; Chroma has no `time_in` / `vector_in`).
_ORIGINAL_MARKERS = ("img_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                     "double_blocks.0.img_attn.qkv.weight")
# Flux.1's head width (128) splits between the rotary axes as (16, 56, 56); other widths in the
# same proportions (the axes are not in the file).
_ROPE_SHARES = (2, 7, 7)

# (original module, diffusers module), each with .weight and .bias.
_TOP_LINEARS = (
    ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_GUIDANCE_LINEARS = (
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
_DOUBLE_LINEARS = (
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
)
_DOUBLE_NORMS = (
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
# Fused projections: original module -> the diffusers modules its output rows hold, in order.
_DOUBLE_FUSED = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
)
_SINGLE_LINEARS = (("modulation.lin", "norm.linear"), ("linear2", "proj_out"))
_SINGLE_NORMS = (("norm.query_norm.scale", "attn.norm_q.weight"),
                 ("norm.key_norm.scale", "attn.norm_k.weight"))
_SINGLE_FUSED = ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
_FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")

Transform = Optional[Callable[[np.ndarray], np.ndarray]]


def is_original_flux(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are an original-layout Flux.1 transformer (with or without the
    `model.diffusion_model.` prefix)."""
    keys = set(keys)
    return any(all(prefix + marker in keys for marker in _ORIGINAL_MARKERS)
               for prefix in ("", ORIGINAL_PREFIX))


def _rows(start: int, stop: int) -> Callable[[np.ndarray], np.ndarray]:
    """Output rows start:stop of a fused (out, in) weight or (out,) bias."""
    return lambda array: array[start:stop]


def _swap_halves(array: np.ndarray) -> np.ndarray:
    """BFL's final adaLN emits (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)."""
    shift, scale = np.split(array, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


def _original_mapping(config: FluxConfig) -> dict[str, tuple[str, Transform]]:
    """diffusers name -> (original name, transform) for every tensor of `config`'s model."""
    mapping: dict[str, tuple[str, Transform]] = {}

    def linear(original: str, diffusers: str, transform: Transform = None) -> None:
        for p in ("weight", "bias"):
            mapping[f"{diffusers}.{p}"] = (f"{original}.{p}", transform)

    def fused(original: str, targets: tuple[str, ...], widths: tuple[int, ...]) -> None:
        bounds = np.cumsum((0,) + widths)
        for target, start, stop in zip(targets, bounds[:-1], bounds[1:]):
            linear(original, target, _rows(int(start), int(stop)))

    dim = config.inner_dim
    top = _TOP_LINEARS + (_GUIDANCE_LINEARS if config.guidance_embeds else ())
    for original, diffusers in top:
        linear(original, diffusers)
    linear(*_FINAL_MODULATION, _swap_halves)
    for i in range(config.num_layers):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for original, diffusers in _DOUBLE_LINEARS:
            linear(old + original, new + diffusers)
        for original, diffusers in _DOUBLE_NORMS:
            mapping[new + diffusers] = (old + original, None)
        for original, targets in _DOUBLE_FUSED:
            fused(old + original, tuple(new + t for t in targets), (dim,) * 3)
    for i in range(config.num_single_layers):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for original, diffusers in _SINGLE_LINEARS:
            linear(old + original, new + diffusers)
        for original, diffusers in _SINGLE_NORMS:
            mapping[new + diffusers] = (old + original, None)
        original, targets = _SINGLE_FUSED
        fused(old + original, tuple(new + t for t in targets), (dim,) * 3 + (MLP_RATIO * dim,))
    return mapping


def _shape(source: TensorSource, key: str) -> tuple[int, ...]:
    if key not in source:
        raise WeightsError(f"{source.name}: {WHAT} (original layout): no tensor {key!r}")
    return tuple(source.shape(key))


def _block_count(keys: Iterable[str], name: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def flux_config_from_original(source: TensorSource,
                              axes_dims_rope: Optional[tuple[int, ...]] = None) -> FluxConfig:
    """The `FluxConfig` of an original-layout transformer, from its key names and shapes: block
    counts, widths, guidance embedding (Flux.1 dev's `guidance_in`). The rotary axes are not in the
    file: `axes_dims_rope` None splits the head width as Flux.1 does (16, 56, 56 of 128)."""
    keys = list(source)
    where = f"{source.name}: {WHAT} (original layout)"
    if any(k.startswith(ORIGINAL_PREFIX) for k in keys):
        raise WeightsError(f"{where}: strip the {ORIGINAL_PREFIX!r} prefix first")
    dim, in_channels = _shape(source, "img_in.weight")
    norm_key = ("double_blocks.0.img_attn.norm.query_norm.scale" if _block_count(keys, "double_blocks")
                else "single_blocks.0.norm.query_norm.scale")
    (head_dim,) = _shape(source, norm_key)
    if dim % head_dim:
        raise WeightsError(f"{where}: width {dim} (img_in.weight) is not a multiple of the head "
                           f"width {head_dim} ({norm_key})")
    if axes_dims_rope is None:
        unit, rest = divmod(head_dim, sum(_ROPE_SHARES))
        axes_dims_rope = tuple(unit * s for s in _ROPE_SHARES)
        if rest or any(d % 2 for d in axes_dims_rope):
            raise WeightsError(f"{where}: head width {head_dim} ({norm_key}) has no Flux.1 split "
                               f"between the rotary axes; pass axes_dims_rope")
    out_channels = _shape(source, "final_layer.linear.weight")[0]
    try:
        return FluxConfig(
            in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
            num_layers=_block_count(keys, "double_blocks"),
            num_single_layers=_block_count(keys, "single_blocks"),
            attention_head_dim=head_dim, num_attention_heads=dim // head_dim,
            joint_attention_dim=_shape(source, "txt_in.weight")[1],
            pooled_projection_dim=_shape(source, "vector_in.in_layer.weight")[1],
            guidance_embeds="guidance_in.in_layer.weight" in source,
            axes_dims_rope=tuple(axes_dims_rope))
    except ValueError as err:
        raise WeightsError(f"{where}: {err}") from None


def _original_as_diffusers(source: TensorSource, config: FluxConfig, shapes: dict) -> TensorSource:
    """A lazy view of an original-layout transformer under diffusers' names, for `config`'s
    model whose params have `shapes`. A tensor the model needs but the file lacks, one the file has
    but the model does not use, or one of the wrong shape (on read) is an error naming the file's
    key."""
    mapping = _original_mapping(config)
    used = {original for original, _ in mapping.values()}
    where = f"{source.name}: {WHAT} (original layout)"
    missing = sorted(used - set(source))
    if missing:
        raise WeightsError(f"{where}: missing keys: {short_list(missing)}")
    unexpected = sorted(set(source) - used)
    if unexpected:
        raise WeightsError(f"{where}: unexpected keys: {short_list(unexpected)}")
    expected = _original_shapes(mapping, shapes)
    return RenamedSource(source, {new: (old, _checked(old, expected[old], transform, where))
                                  for new, (old, transform) in mapping.items()})


def _original_shapes(mapping: dict[str, tuple[str, Transform]], params_shapes: dict
                     ) -> dict[str, tuple[int, ...]]:
    """original name -> the shape it must have (PyTorch layout): its diffusers tensor's, or for a
    fused one, its diffusers tensors' rows stacked."""
    shapes = {"/".join(path): leaf.shape for path, leaf in
              traverse_util.flatten_dict(params_shapes).items()}
    out: dict[str, tuple[int, ...]] = {}
    for new, (old, _) in mapping.items():
        path = rename_key(new)
        shape = tuple(shapes[path])[::-1] if path.endswith("/kernel") else tuple(shapes[path])
        out[old] = (out[old][0] + shape[0],) + shape[1:] if old in out else shape
    return out


def _checked(key: str, shape: tuple[int, ...], transform: Transform, where: str
             ) -> Callable[[np.ndarray], np.ndarray]:
    """`transform`, after checking that the file's tensor `key` has `shape`: a wrong width is
    named by the file's key, not by the diffusers names it is split into."""
    def read(array: np.ndarray) -> np.ndarray:
        if tuple(array.shape) != shape:
            raise WeightsError(f"{where}: shape mismatch for {key}: expected {shape}, got "
                               f"{tuple(array.shape)}")
        return array if transform is None else transform(array)
    return read


def flux_params_from_original(source: TensorSource, config: FluxConfig, dtype=None) -> dict:
    """Params of `FluxTransformer(config)` from an original-layout (BFL) state dict, the
    `model.diffusion_model.` prefix stripped. `dtype` as for `flux_params`."""
    shapes = flux_shapes(config)
    return convert_state_dict(_original_as_diffusers(source, config, shapes), rename_key, shapes,
                              what=WHAT, dtype=dtype)


__all__ = ["flux_params", "load_flux", "flux_shapes", "rename_key", "diffusers_key",
           "is_original_flux", "flux_config_from_original", "flux_params_from_original"]
