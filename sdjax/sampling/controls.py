"""ControlNets applied to a request: `Control` (which ControlNet, its image, scale and start/end),
the batch arrays they become, and `ControlNetLibrary`, the Generator's loaded ControlNets.

What a program is compiled for is only the ControlNets' configs (`SamplingSpec.controlnets`) and
guess mode; images, scales and start/end are data, so sweeping them never recompiles.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import numpy as np

from sdjax.preprocessors import control_image
from sdjax.sampling.spec import SamplingSpec


@dataclasses.dataclass
class Control:
    """One ControlNet applied to every image of a request.

    controlnet: a path (a diffusers folder or a single file), a name of the Generator's
      `controlnet_dir`, or loaded `sdjax.weights.controlnet.ControlNetWeights`.
    image: one control image for the request, or one per image (a list, or an array stacked
      along a first axis): a path, PIL image, uint8 array or float array in [0, 1] (see
      `sdjax.preprocessors.control_image`).
    scale: the conditioning scale, one value or one per image (data: no recompilation).
    start, end: the fractions of the steps run between which the ControlNet acts; step i of N is
      on unless i/N < start or (i + 1)/N > end (diffusers' control_guidance_start / _end).
    preprocess: "none", "mask" or "canny" (`sdjax.preprocessors.PREPROCESSORS`).
    """
    controlnet: Any
    image: Any
    scale: float | Sequence[float] = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"


def check_control(control: Control, k: int) -> None:
    if not isinstance(control, Control):
        raise ValueError(f"controls[{k}] must be a sampling.Control, got {type(control).__name__}")
    for name in ("start", "end"):
        value = getattr(control, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"controls[{k}].{name} must be a number, got {value!r}")
    if not 0.0 <= control.start < control.end <= 1.0:
        raise ValueError(f"controls[{k}]: start {control.start} and end {control.end} must satisfy "
                         f"0 <= start < end <= 1 (fractions of the steps)")


def step_keep(start: float, end: float, steps: int) -> np.ndarray:
    """(steps,) 1.0 where the ControlNet acts at step i of `steps`, computed in float64 exactly as
    diffusers' pipelines do: off where i/N < start or (i + 1)/N > end."""
    return np.array([1.0 - float(i / steps < start or (i + 1) / steps > end)
                     for i in range(steps)], np.float32)


def control_arrays(controls: Sequence[Control], spec: SamplingSpec, n: int) -> dict:
    """The batch arrays of a request's controls (aligned with spec.controlnets): control_image_{k}
    (n, H, W, C), control_scale (n, K), control_keep (n, K, steps run)."""
    from sdjax.sampling.requests import per_image

    if len(controls) != len(spec.controlnets):
        raise ValueError(f"{len(controls)} controls but the spec was made for "
                         f"{len(spec.controlnets)} ControlNets")
    steps_run = spec.steps - spec.start_step
    out, scales, keeps = {}, [], []
    for k, (control, config) in enumerate(zip(controls, spec.controlnets)):
        check_control(control, k)
        images = control.image
        if isinstance(images, np.ndarray) and images.ndim == 4:  # (B, H, W, C): one per image
            images = list(images)
        if isinstance(images, (list, tuple)):
            images = per_image(images, n, f"controls[{k}].image")
        else:
            images = [images] * n
        cache: dict[int, np.ndarray] = {}
        rows = []
        for image in images:  # one image shared by every row is read and resized once
            if id(image) not in cache:
                cache[id(image)] = control_image(
                    image, spec.height, spec.width, preprocess=control.preprocess,
                    channels=config.conditioning_channels, what=f"controls[{k}].image")
            rows.append(cache[id(image)])
        out[f"control_image_{k}"] = np.stack(rows)
        scale = np.asarray(per_image(control.scale, n, f"controls[{k}].scale"), np.float64)
        if not np.all(np.isfinite(scale)):
            raise ValueError(f"controls[{k}].scale must be finite, got {control.scale!r}")
        scales.append(scale.astype(np.float32))
        keeps.append(np.broadcast_to(step_keep(control.start, control.end, steps_run),
                                     (n, steps_run)))
    out["control_scale"] = np.stack(scales, axis=1)
    out["control_keep"] = np.stack(keeps, axis=1).astype(np.float32)
    return out


class ControlNetLibrary:
    """Loaded ControlNets by path (or name in `directory`), each loaded and placed once.

    `base` is the U-Net config they are used with (what a single file's config cannot show comes
    from it); `place` puts a params tree where the programs take it; `dtype` casts on load.
    """

    def __init__(self, base, *, directory: Optional[str | os.PathLike] = None,
                 place: Callable = lambda tree: tree, dtype: Any = None):
        self.base, self.directory, self.place, self.dtype = base, directory, place, dtype
        self._loaded: dict[Any, tuple[Any, Any]] = {}

    def resolve(self, reference: str | os.PathLike) -> pathlib.Path:
        """A path as given, or a name looked up in `directory` (with .safetensors or as a folder)."""
        given = pathlib.Path(reference).expanduser()
        candidates = []
        if self.directory is not None and not given.is_absolute():
            folder = pathlib.Path(self.directory).expanduser()
            candidates += [folder / given, folder / f"{given}.safetensors"]
        candidates.append(given)
        for candidate in candidates:
            if candidate.exists():
                return candidate.resolve()
        where = f" (nor in --controlnet_dir {self.directory})" if self.directory else ""
        raise ValueError(f"ControlNet {os.fspath(reference)!r}: no such file or folder{where}")

    def get(self, reference) -> tuple[Any, Any]:
        """(ControlNetWeights, placed params) for a path, a name, or loaded ControlNetWeights."""
        from sdjax.weights.controlnet import ControlNetWeights, load_controlnet

        if isinstance(reference, ControlNetWeights):
            key = ("object", id(reference))
            if key not in self._loaded:
                self._loaded[key] = (reference, self.place(self._cast(reference.params)))
            return self._loaded[key]
        if not isinstance(reference, (str, os.PathLike)):
            raise ValueError(f"a ControlNet is a path, a name or ControlNetWeights, got "
                             f"{type(reference).__name__}")
        path = self.resolve(reference)
        if path not in self._loaded:
            weights = load_controlnet(path, base=self.base, dtype=self.dtype)
            self._loaded[path] = (weights, self.place(weights.params))
        return self._loaded[path]

    def _cast(self, params):
        if self.dtype is None:
            return params
        import jax

        return jax.tree.map(lambda x: np.asarray(x, dtype=self.dtype), params)
