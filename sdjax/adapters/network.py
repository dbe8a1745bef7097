"""Adapters (LoRA, LoCon, LoHa, LoKr) as data: each targeted layer's factors in sdjax's layouts, and
the two ways to apply them to a model's params.

- At run time: `runtime_variables` lays the factors of several adapters out as the variable
  collection `models.layers.ADAPTER_COLLECTION` (low-rank factors concatenated along the rank, one
  scale per rank holding weight * alpha / rank), which `Dense` and `Conv2D` add to their output.
  The weights are arrays: changing one, or switching between adapters of the same ranks and targets,
  never recompiles.
- Merged: `merge` adds sum(weight * delta) into copies of the targeted kernels (the base params are
  left as they were, so dropping the merged tree restores the base exactly).

Layouts: a dense layer's kernel is (in, out); a conv's is (kh, kw, in, out). A low-rank factor pair
is `down` (in, r) or (kh, kw, in, r) and `up` (r, out): delta = down . up * alpha / r.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

from sdjax.models.layers import ADAPTER_COLLECTION, ADAPTERS_KEY

# The models of a params dict that adapters may target, as `Pretrained.params` names them: the
# denoiser (a U-Net, or the SD3 / Flux transformer; an adapter's U-Net weight is either's) and the
# CLIP text encoders (Flux's second encoder is a T5, which no adapter file targets).
UNET, TRANSFORMER, TEXT_ENCODERS = "unet", "transformer", ("text_encoder", "text_encoder_2")
DENOISERS = (UNET, TRANSFORMER)
MODEL_NAMES = DENOISERS + TEXT_ENCODERS


class AdapterError(ValueError):
    """An adapter file or its use is wrong; the message names the file, key or layer at fault."""


@dataclasses.dataclass(frozen=True)
class LowRank:
    """delta = down . up * alpha / rank (LoRA; LoCon when `down` is a conv kernel)."""
    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, kernel_shape: tuple[int, ...]) -> np.ndarray:
        down = fit_down(self.down.astype(np.float32), kernel_shape, self.rank)
        flat = down.reshape(-1, self.rank) @ self.up.astype(np.float32)
        return flat.reshape(kernel_shape) * np.float32(self.scale)


@dataclasses.dataclass(frozen=True)
class DenseDelta:
    """A full-size delta (LoHa and LoKr products, which are not low rank), kernel-shaped, already
    including the adapter's own alpha scaling; `bias` (out,), when given, is added to the layer's
    bias (LyCORIS `diff_b`), scaled by the adapter's weight alone."""
    delta: np.ndarray
    bias: Optional[np.ndarray] = None

    def delta_of(self, kernel_shape: tuple[int, ...]) -> np.ndarray:
        return self.delta.astype(np.float32).reshape(kernel_shape)


Factor = LowRank | DenseDelta


@dataclasses.dataclass
class Adapter:
    """One adapter file's factors: modules[model name][layer path] (e.g. modules["unet"]
    ["down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q"]), the file's metadata, and
    the file it came from (for messages)."""
    name: str
    modules: dict[str, dict[str, Factor]]
    metadata: dict = dataclasses.field(default_factory=dict)
    source: str = ""

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in MODEL_NAMES if self.modules.get(m))

    def num_layers(self) -> int:
        return sum(len(layers) for layers in self.modules.values())


@dataclasses.dataclass(frozen=True)
class Weighted:
    """An adapter with its weight for the denoiser (`unet`: the U-Net, or the SD3 / Flux
    transformer) and for the text encoder(s)."""
    adapter: Adapter
    unet: float = 1.0
    text_encoder: float = 1.0

    def weight_for(self, model: str) -> float:
        return self.unet if model in DENOISERS else self.text_encoder


def fit_down(down: np.ndarray, kernel_shape: tuple[int, ...], rank: int) -> np.ndarray:
    """A low-rank `down` in the target kernel's layout: a dense target takes (in, r); a conv
    target takes (kh, kw, in, r), where a 1x1 down on a larger kernel is its centre tap."""
    if len(kernel_shape) == 2:
        return down.reshape(kernel_shape[0], rank)
    kh, kw, cin = kernel_shape[:3]
    if down.ndim == 2:
        down = down.reshape(1, 1, cin, rank)
    if down.shape[:2] != (kh, kw):
        if down.shape[:2] != (1, 1):
            raise AdapterError(f"down kernel {down.shape[:2]} does not fit a {kh}x{kw} conv")
        centred = np.zeros((kh, kw, cin, rank), down.dtype)
        centred[kh // 2, kw // 2] = down[0, 0]
        down = centred
    return down


def kernel_shapes(params: Mapping, model: str) -> dict[str, tuple[int, ...]]:
    """{layer path: kernel shape} of the layers of params[model] that adapters can target."""
    flat = traverse_util.flatten_dict(params[model])
    return {"/".join(k[:-1]): tuple(np.shape(v)) for k, v in flat.items()
            if k[-1] == "kernel" and len(np.shape(v)) in (2, 4)}


def check_targets(adapter: Adapter, params: Mapping) -> None:
    """Every layer `adapter` targets exists in `params` with a kernel its factors fit, else an
    AdapterError naming the adapter's file, the layer and both shapes."""
    for model, layers in adapter.modules.items():
        if not layers:
            continue
        if model not in params:
            raise AdapterError(f"{adapter.source or adapter.name}: adapts {model}, which this model "
                               f"does not have (it has {', '.join(k for k in params if k in MODEL_NAMES)})")
        kernels = kernel_shapes(params, model)
        flat = traverse_util.flatten_dict(params[model])
        for path, factor in layers.items():
            if path not in kernels:
                raise AdapterError(f"{adapter.source or adapter.name}: {model} has no layer {path}")
            if getattr(factor, "bias", None) is not None:
                bias = flat.get(tuple(path.split("/")) + ("bias",))
                if bias is None or np.shape(bias) != np.shape(factor.bias):
                    raise AdapterError(
                        f"{adapter.source or adapter.name}: {model} {path}: the adapter changes a "
                        f"bias of shape {np.shape(factor.bias)}, the layer has "
                        f"{'none' if bias is None else np.shape(bias)}: made for another model?")
            shape = kernels[path]
            if isinstance(factor, LowRank):
                fits = factor.up.shape[-1] == shape[-1] and (
                    factor.down.shape[:-1] == shape[:-1]
                    or (len(shape) == 4 and factor.down.shape[:-1] in ((shape[2],), (1, 1, shape[2])))
                    or (len(shape) == 2 and int(np.prod(factor.down.shape[:-1])) == shape[0]))
                got = f"down {factor.down.shape}, up {factor.up.shape}"
            else:
                fits = int(np.prod(factor.delta.shape)) == int(np.prod(shape)) and \
                    factor.delta.shape[-1] == shape[-1]
                got = f"delta {factor.delta.shape}"
            if not fits:
                raise AdapterError(f"{adapter.source or adapter.name}: {model} {path}: the layer's "
                                   f"kernel is {shape} (sdjax layout), the adapter's factors are "
                                   f"{got}: made for another model?")


def runtime_variables(adapters: Sequence[Weighted], params: Mapping,
                      dtype=np.float32) -> dict[str, dict]:
    """{model name: its ADAPTER_COLLECTION tree} for `adapters` applied at run time, for
    params[ADAPTERS_KEY]. Low-rank factors of several adapters on one layer are concatenated along
    the rank; the weights enter only through the scale leaves (`runtime_scales`), so they are data."""
    for weighted in adapters:
        check_targets(weighted.adapter, params)
    flat = runtime_scales(adapters, params)
    for model in MODEL_NAMES:
        if model not in params:
            continue
        kernels = kernel_shapes(params, model)
        layers: dict[str, dict[str, list]] = {}
        for weighted in adapters:
            for path, factor in weighted.adapter.modules.get(model, {}).items():
                entry = layers.setdefault(path, {"down": [], "up": [], "delta": [], "bias": []})
                if isinstance(factor, LowRank):
                    entry["down"].append(fit_down(factor.down, kernels[path], factor.rank))
                    entry["up"].append(factor.up)
                else:
                    entry["delta"].append(factor.delta_of(kernels[path]))
                    entry["bias"].append(factor.bias)
        for path, entry in layers.items():
            key = (model,) + tuple(path.split("/"))
            if entry["down"]:
                flat[key + ("down",)] = np.concatenate(entry["down"], axis=-1).astype(dtype)
                flat[key + ("up",)] = np.concatenate(entry["up"], axis=0).astype(dtype)
            if entry["delta"]:
                flat[key + ("delta",)] = np.stack(entry["delta"]).astype(dtype)
            if any(b is not None for b in entry["bias"]):
                out_features = kernels[path][-1]
                flat[key + ("delta_bias",)] = np.stack([
                    np.zeros(out_features, np.float32) if b is None else b.astype(np.float32)
                    for b in entry["bias"]]).astype(dtype)
    return traverse_util.unflatten_dict(flat) if flat else {}


def runtime_scales(adapters: Sequence[Weighted], params: Mapping) -> dict[tuple, np.ndarray]:
    """The weight-dependent leaves of `runtime_variables`, flattened ({(model, *layer path,
    "scale" | "delta_scale"): array}): weight * alpha / rank per rank column of the concatenated
    low-rank factors, and the weight per dense delta, in adapter order. A weight change replaces
    only these."""
    out: dict[tuple, np.ndarray] = {}
    for model in MODEL_NAMES:
        if model not in params:
            continue
        layers: dict[str, tuple[list, list]] = {}
        for weighted in adapters:
            weight = np.float32(weighted.weight_for(model))
            for path, factor in weighted.adapter.modules.get(model, {}).items():
                scales, delta_scales = layers.setdefault(path, ([], []))
                if isinstance(factor, LowRank):
                    scales.append(np.full(factor.rank, weight * factor.scale, np.float32))
                else:
                    delta_scales.append(np.float32(weight))
        for path, (scales, delta_scales) in layers.items():
            key = (model,) + tuple(path.split("/"))
            if scales:
                out[key + ("scale",)] = np.concatenate(scales)
            if delta_scales:
                out[key + ("delta_scale",)] = np.asarray(delta_scales, np.float32)
    return out


def with_runtime_adapters(params: Mapping, adapters: Sequence[Weighted]) -> dict:
    """`params` (a `Pretrained.params` dict) carrying `adapters` for run-time application; without
    adapters, `params` without any."""
    base = {k: v for k, v in params.items() if k != ADAPTERS_KEY}
    variables = runtime_variables(adapters, base) if adapters else {}
    return {**base, ADAPTERS_KEY: variables} if variables else base


def _weighted_delta(factor: Factor, kernel_shape: tuple[int, ...], weight: np.float32) -> np.ndarray:
    """weight * `factor`'s delta as a new float32 array. A low-rank factor's scales go into its
    small `down`, so the product is the only kernel-sized array a layer's merge allocates (scaling
    the product instead made seven)."""
    if isinstance(factor, LowRank):
        down = fit_down(factor.down.astype(np.float32), kernel_shape, factor.rank)
        down = down.reshape(-1, factor.rank) * np.float32(weight * np.float32(factor.scale))
        return (down @ factor.up.astype(np.float32)).reshape(kernel_shape)
    delta = factor.delta_of(kernel_shape)  # a copy
    delta *= weight
    return delta


def merge(params: Mapping, adapters: Sequence[Weighted], *,
          only: Optional[Sequence[str]] = None) -> dict:
    """A params dict with sum(weight * delta) added to the targeted kernels, computed in float32 and
    stored in each kernel's dtype. `params` is not modified: untouched leaves are shared, touched
    kernels are new arrays, so keeping `params` keeps the base exactly."""
    for weighted in adapters:
        check_targets(weighted.adapter, params)
    merged = dict(params)
    for model in MODEL_NAMES:
        if model not in params or (only is not None and model not in only):
            continue
        deltas: dict[str, np.ndarray] = {}
        bias_deltas: dict[str, np.ndarray] = {}
        kernels = kernel_shapes(params, model)
        for weighted in adapters:
            weight = np.float32(weighted.weight_for(model))
            if weight == 0:
                continue
            for path, factor in weighted.adapter.modules.get(model, {}).items():
                delta = _weighted_delta(factor, kernels[path], weight)
                if path in deltas:
                    deltas[path] += delta
                else:
                    deltas[path] = delta
                if getattr(factor, "bias", None) is not None:
                    bias_deltas[path] = bias_deltas.get(path, 0) + weight * factor.bias.astype(np.float32)
        if not deltas:
            continue
        flat = traverse_util.flatten_dict(params[model])
        for leaf, changes in (("kernel", deltas), ("bias", bias_deltas)):
            for path, delta in changes.items():
                key = tuple(path.split("/")) + (leaf,)
                value = np.asarray(flat[key])
                delta += value  # `delta` is merge's own float32 array: the sum is written in place
                flat[key] = delta.astype(value.dtype, copy=False)
        merged[model] = traverse_util.unflatten_dict(flat)
    return merged


__all__ = ["Adapter", "AdapterError", "DenseDelta", "LowRank", "Weighted", "check_targets",
           "fit_down", "kernel_shapes", "merge", "runtime_scales", "runtime_variables", "with_runtime_adapters",
           "ADAPTER_COLLECTION", "ADAPTERS_KEY", "DENOISERS", "MODEL_NAMES", "TRANSFORMER"]
