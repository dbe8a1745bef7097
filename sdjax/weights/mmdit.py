"""SD3 / SD3.5 transformer weights -> sdjax `MMDiT` params: diffusers `SD3Transformer2DModel`
folders and state dicts, and Stability's original single-file layout (`joint_blocks.N.x_block...`,
fused q/k/v), read as diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` reads it."""
from __future__ import annotations

import math
import os
import pathlib
import re
from typing import Callable, Iterator, Optional

import numpy as np

from sdjax.models.mmdit import MMDiT, MMDiTConfig, example_inputs
from sdjax.weights.common import (RenamedSource, TensorSource, WeightsError, abstract_params,
                                  convert_state_dict, inverse_key, read_model_config, short_list)
from sdjax.weights.unet import open_weights

CLASS_NAME = "SD3Transformer2DModel"
# Where the transformer sits in a full original checkpoint (SD3 bundles text encoders and the VAE
# beside it under other prefixes).
ORIGINAL_PREFIX = "model.diffusion_model."
# SD3 files carry no head width; Stability's MMDiTs all use 64 (SD3.5's qk-norm weights show it).
HEAD_DIM = 64

# diffusers module paths whose sdjax names differ: list indices become `_i` suffixes on the joint
# blocks, and the single-entry lists around linears (to_out.0, ff.net.0.proj / ff.net.2) go.
_MODULE_RENAMES = ((re.compile(r"^transformer_blocks\.(\d+)\."), r"joint_blocks_\1."),
                   (re.compile(r"\.to_out\.0$"), ".to_out"),
                   (re.compile(r"\.net\.0\.proj$"), ".proj"),
                   (re.compile(r"\.net\.2$"), ".out"))
# RMSNorm weights are flax `scale`s; every other `.weight` is a dense or conv kernel.
_NORM_MODULE = re.compile(r"(^|\.)norm_(q|k|added_q|added_k)$")


def rename_key(key: str) -> Optional[str]:
    """The sdjax params path of a diffusers `SD3Transformer2DModel` state-dict key:
    `transformer_blocks.0.attn.to_out.0.weight` -> `joint_blocks_0/attn/to_out/kernel`."""
    if key == "pos_embed.pos_embed":
        return "pos_embed/pos_embed"
    module, _, leaf = key.rpartition(".")
    for pattern, replacement in _MODULE_RENAMES:
        module = pattern.sub(replacement, module)
    if leaf == "weight":
        leaf = "scale" if _NORM_MODULE.search(module) else "kernel"
    return f"{module}.{leaf}".replace(".", "/")


# sdjax module paths -> diffusers': the inverse of _MODULE_RENAMES.
_DIFFUSERS_MODULES = ((re.compile(r"^joint_blocks_(\d+)\."), r"transformer_blocks.\1."),
                      (re.compile(r"\.to_out$"), ".to_out.0"),
                      (re.compile(r"(^|\.)(ff|ff_context)\.proj$"), r"\1\2.net.0.proj"),
                      (re.compile(r"(^|\.)(ff|ff_context)\.out$"), r"\1\2.net.2"))


def diffusers_key(path: str) -> str:
    """The diffusers state-dict key of an sdjax MMDiT params path, the inverse of `rename_key`
    (checked against it): `joint_blocks_0/attn/to_out/kernel` ->
    `transformer_blocks.0.attn.to_out.0.weight`."""
    if path == "pos_embed/pos_embed":  # a buffer in diffusers, named as it is here
        return "pos_embed.pos_embed"
    return inverse_key(path, rename_key, _DIFFUSERS_MODULES, "diffusers MMDiT")


def mmdit_shapes(config: MMDiTConfig) -> dict:
    """Shapes and dtypes of `MMDiT(config)`'s params (nothing allocated)."""
    return abstract_params(MMDiT(config), *example_inputs(config))


def mmdit_params(source: TensorSource, config: MMDiTConfig, dtype=None) -> dict:
    """Params for `MMDiT(config)` from a diffusers-named state dict. `dtype` None keeps float32."""
    return convert_state_dict(source, rename_key, mmdit_shapes(config), what=CLASS_NAME,
                              dtype=dtype)


def load_mmdit(folder: str | os.PathLike, dtype=None, *,
               attention: str = "xla") -> tuple[MMDiTConfig, dict]:
    """A diffusers `SD3Transformer2DModel` folder (a pipeline's `transformer/`: config.json +
    safetensors weights, single or sharded, plain or the fp16 variant) -> (MMDiTConfig, params)."""
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    raw = read_model_config(folder, CLASS_NAME)
    try:
        config = MMDiTConfig.from_diffusers(raw, attention=attention)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{config_path}: {err}") from None
    return config, mmdit_params(open_weights(folder, "transformer"), config, dtype=dtype)


# ---- The original (Stability) layout ---------------------------------------------------------------
def is_original_mmdit(keys) -> bool:
    """Whether state-dict keys (with or without `model.diffusion_model.`) hold an SD3 / SD3.5
    transformer in Stability's layout."""
    keys = set(keys)
    return any({prefix + "x_embedder.proj.weight",
                prefix + "joint_blocks.0.x_block.attn.qkv.weight"} <= keys
               for prefix in ("", ORIGINAL_PREFIX))


class _TransformerKeys(TensorSource):
    """The transformer's keys of an original checkpoint with `model.diffusion_model.` stripped
    (all keys when none has it), keeping the file's header shapes at hand. The last tensor read
    is kept: q, k and v are read one after the other from the same fused tensor."""

    def __init__(self, source: TensorSource):
        self._source = source
        self.name = source.name
        prefixed = [k for k in source if k.startswith(ORIGINAL_PREFIX)]
        self._keys = ({k[len(ORIGINAL_PREFIX):]: k for k in prefixed} if prefixed
                      else {k: k for k in source})
        self._last: tuple[Optional[str], Optional[np.ndarray]] = (None, None)

    def __getitem__(self, key: str) -> np.ndarray:
        if self._last[0] != key:
            self._last = (key, self._source[self._keys[key]])
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the header when the source has one (nothing read)."""
        shape_of = getattr(self._source, "shape", None)
        if shape_of is not None:
            return tuple(shape_of(self._keys[key]))
        return tuple(np.shape(self[key]))


def _part(index: int, parts: int) -> Callable[[np.ndarray], np.ndarray]:
    """Rows `index` of `parts` equal blocks (q | k | v of a fused qkv)."""
    def take(array: np.ndarray) -> np.ndarray:
        rows = array.shape[0] // parts
        return array[index * rows:(index + 1) * rows]
    return take


def _swap_halves(array: np.ndarray) -> np.ndarray:
    """Stability's final adaLN (and the last block's text-stream adaLN) output shift then scale;
    diffusers' AdaLayerNormContinuous splits scale then shift (diffusers' `swap_scale_shift`)."""
    half = array.shape[0] // 2
    return np.concatenate([array[half:], array[:half]])


_P = r"(?P<p>weight|bias)"
_QKV = tuple((name, _part(i, 3)) for i, name in enumerate("qkv"))
# Original key (below the prefix) -> diffusers names with transforms; `{i}` is the block index,
# `{p}` weight or bias. The last block's text-stream adaLN is swapped in `_original_mapping`.
_ORIGINAL_RULES: tuple[tuple[str, tuple[tuple[str, Optional[Callable]], ...]], ...] = (
    (r"pos_embed", (("pos_embed.pos_embed", None),)),
    (rf"x_embedder\.proj\.{_P}", (("pos_embed.proj.{p}", None),)),
    (rf"t_embedder\.mlp\.0\.{_P}", (("time_text_embed.timestep_embedder.linear_1.{p}", None),)),
    (rf"t_embedder\.mlp\.2\.{_P}", (("time_text_embed.timestep_embedder.linear_2.{p}", None),)),
    (rf"y_embedder\.mlp\.0\.{_P}", (("time_text_embed.text_embedder.linear_1.{p}", None),)),
    (rf"y_embedder\.mlp\.2\.{_P}", (("time_text_embed.text_embedder.linear_2.{p}", None),)),
    (rf"context_embedder\.{_P}", (("context_embedder.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.x_block\.attn\.qkv\.{_P}",
     tuple((f"transformer_blocks.{{i}}.attn.to_{n}.{{p}}", t) for n, t in _QKV)),
    (rf"joint_blocks\.(?P<i>\d+)\.context_block\.attn\.qkv\.{_P}",
     tuple((f"transformer_blocks.{{i}}.attn.add_{n}_proj.{{p}}", t) for n, t in _QKV)),
    (rf"joint_blocks\.(?P<i>\d+)\.x_block\.attn2\.qkv\.{_P}",
     tuple((f"transformer_blocks.{{i}}.attn2.to_{n}.{{p}}", t) for n, t in _QKV)),
    (r"joint_blocks\.(?P<i>\d+)\.x_block\.attn\.ln_(?P<n>[qk])\.weight",
     (("transformer_blocks.{i}.attn.norm_{n}.weight", None),)),
    (r"joint_blocks\.(?P<i>\d+)\.context_block\.attn\.ln_(?P<n>[qk])\.weight",
     (("transformer_blocks.{i}.attn.norm_added_{n}.weight", None),)),
    (r"joint_blocks\.(?P<i>\d+)\.x_block\.attn2\.ln_(?P<n>[qk])\.weight",
     (("transformer_blocks.{i}.attn2.norm_{n}.weight", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.x_block\.attn\.proj\.{_P}",
     (("transformer_blocks.{i}.attn.to_out.0.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.context_block\.attn\.proj\.{_P}",
     (("transformer_blocks.{i}.attn.to_add_out.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.x_block\.attn2\.proj\.{_P}",
     (("transformer_blocks.{i}.attn2.to_out.0.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.x_block\.adaLN_modulation\.1\.{_P}",
     (("transformer_blocks.{i}.norm1.linear.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.context_block\.adaLN_modulation\.1\.{_P}",
     (("transformer_blocks.{i}.norm1_context.linear.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.x_block\.mlp\.fc1\.{_P}",
     (("transformer_blocks.{i}.ff.net.0.proj.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.x_block\.mlp\.fc2\.{_P}",
     (("transformer_blocks.{i}.ff.net.2.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.context_block\.mlp\.fc1\.{_P}",
     (("transformer_blocks.{i}.ff_context.net.0.proj.{p}", None),)),
    (rf"joint_blocks\.(?P<i>\d+)\.context_block\.mlp\.fc2\.{_P}",
     (("transformer_blocks.{i}.ff_context.net.2.{p}", None),)),
    (rf"final_layer\.linear\.{_P}", (("proj_out.{p}", None),)),
    (rf"final_layer\.adaLN_modulation\.1\.{_P}", (("norm_out.linear.{p}", _swap_halves),)),
)
_COMPILED_RULES = tuple((re.compile(pattern), targets) for pattern, targets in _ORIGINAL_RULES)


def _original_mapping(keys: _TransformerKeys, num_layers: int) -> dict:
    """diffusers name -> (original key, transform) for every key of an original transformer; a key
    no rule knows is an error naming it."""
    mapping: dict[str, tuple[str, Optional[Callable]]] = {}
    unknown = []
    last_context_ada = re.compile(rf"joint_blocks\.{num_layers - 1}\.context_block\."
                                  rf"adaLN_modulation\.1\.(weight|bias)")
    for key in keys:
        for pattern, targets in _COMPILED_RULES:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            swap = last_context_ada.fullmatch(key) is not None
            for template, transform in targets:
                mapping[template.format(**match.groupdict())] = (
                    key, _swap_halves if swap else transform)
            break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{keys.name}: {CLASS_NAME} (original layout): unexpected keys: "
                           + short_list(sorted(unknown)))
    return mapping


def _block_indices(keys, pattern: str) -> list[int]:
    compiled = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(compiled.match, keys) if m})


def mmdit_config_from_original(source: TensorSource, *, attention: str = "xla") -> MMDiTConfig:
    """The `MMDiTConfig` of an original-layout SD3 / SD3.5 transformer (keys with or without
    `model.diffusion_model.`), from tensor shapes (header shapes when the source is a file):
    widths from the embedders, layers from `joint_blocks.N`, MMDiT-X layers from `x_block.attn2`,
    qk-norm from `ln_q`, the head width from `ln_q` (else 64), `pos_embed_max_size` from the
    position table. `sample_size` is not in the file: the default (128, every release's)."""
    keys = _TransformerKeys(source)
    what = f"{keys.name}: {CLASS_NAME} (original layout)"
    try:
        width, in_channels, patch, _ = keys.shape("x_embedder.proj.weight")
        caption_dim, joint_dim = keys.shape("context_embedder.weight")
        _, pooled_dim = keys.shape("y_embedder.mlp.0.weight")
        out_features = keys.shape("final_layer.linear.weight")[0]
        positions = keys.shape("pos_embed")[1]
        qk_norm_keys = [k for k in keys if re.fullmatch(r"joint_blocks\.\d+\.\w+\.attn2?\.ln_q"
                                                        r"\.weight", k)]
        head_dim = keys.shape(qk_norm_keys[0])[0] if qk_norm_keys else HEAD_DIM
    except KeyError as err:
        raise WeightsError(f"{what}: cannot infer the config: no {err.args[0]!r}") from None
    except ValueError as err:  # a tensor of another rank than the layout's
        raise WeightsError(f"{what}: cannot infer the config: unexpected shape ({err})") from None
    layers = _block_indices(keys, r"joint_blocks\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise WeightsError(f"{what}: joint_blocks must be numbered 0..N-1, found "
                           f"{short_list([str(i) for i in layers])}")
    max_size = math.isqrt(positions)
    problems = []
    if max_size * max_size != positions:
        problems.append(f"pos_embed holds {positions} positions, not a square grid")
    if width % head_dim:
        problems.append(f"width {width} is not a multiple of the head width {head_dim}")
    if out_features % (patch * patch):
        problems.append(f"final_layer.linear has {out_features} outputs, not a multiple of "
                        f"{patch}x{patch} patches")
    if problems:
        raise WeightsError(f"{what}: cannot infer the config: {problems[0]}")
    try:
        return MMDiTConfig(
            patch_size=patch, in_channels=in_channels, num_layers=len(layers),
            attention_head_dim=head_dim, num_attention_heads=width // head_dim,
            joint_attention_dim=joint_dim, caption_projection_dim=caption_dim,
            pooled_projection_dim=pooled_dim, out_channels=out_features // (patch * patch),
            pos_embed_max_size=max_size,
            dual_attention_layers=tuple(_block_indices(keys, r"joint_blocks\.(\d+)\.x_block\.attn2\.")),
            qk_norm="rms_norm" if qk_norm_keys else None, attention=attention)
    except ValueError as err:
        raise WeightsError(f"{what}: inferred config is invalid: {err}") from None


def mmdit_params_from_original(source: TensorSource, config: MMDiTConfig, dtype=None) -> dict:
    """Params for `MMDiT(config)` from an original-layout SD3 / SD3.5 transformer (keys with or
    without `model.diffusion_model.`): fused q/k/v split, the final (and last text-stream) adaLN
    halves swapped, as diffusers' converter does. Tensors are read and converted one at a time."""
    keys = _TransformerKeys(source)
    diffusers_view = RenamedSource(keys, _original_mapping(keys, config.num_layers))
    return mmdit_params(diffusers_view, config, dtype=dtype)


__all__ = ["rename_key", "diffusers_key", "mmdit_shapes", "mmdit_params", "load_mmdit", "is_original_mmdit",
           "mmdit_config_from_original", "mmdit_params_from_original", "ORIGINAL_PREFIX",
           "CLASS_NAME", "HEAD_DIM"]
