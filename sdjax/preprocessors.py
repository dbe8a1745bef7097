"""Control images: files, PIL images or arrays -> float32 (H, W, C) in [0, 1] at the drawn size,
through the preprocessor a ControlNet expects ("none": the image as it is; "mask": one channel
thresholded and repeated; "canny": edges by OpenCV, an optional extra).

Resizing follows diffusers' control image processor (PIL, Lanczos), so a picture drawn with the
same ControlNet and image in either library sees the same control input.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

PREPROCESSORS = ("none", "mask", "canny")
# Canny's hysteresis thresholds: the WebUI's and diffusers' examples' defaults (PNG parameters
# record them as the WebUI's "Threshold A" and "Threshold B").
CANNY_THRESHOLDS = (100, 200)


def _as_pil(image: Any, what: str):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{what}: {path}: no such file")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.copy()
        except OSError as err:
            raise ValueError(f"{what}: {path}: not an image ({err})") from None
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{what}: an array must be (H, W) or (H, W, 1|3|4), got {array.shape}")
    if array.dtype != np.uint8:
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{what}: a float array must hold values in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def _none(image, low_threshold, high_threshold):
    return image


def _mask(image, low_threshold, high_threshold):
    """One channel: white where the image is brighter than mid-grey."""
    from PIL import Image

    gray = np.asarray(image.convert("L"))
    return Image.fromarray(np.where(gray >= 128, 255, 0).astype(np.uint8))


def _opencv():
    try:
        import cv2
    except ImportError:
        raise ValueError("preprocess 'canny' needs OpenCV: pip install 'sdjax[control]' "
                         "(opencv-python-headless)") from None
    return cv2


def _canny(image, low_threshold, high_threshold):
    """OpenCV's Canny edges (the annotator ControlNet's canny models were trained with)."""
    from PIL import Image

    edges = _opencv().Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(edges)


_FUNCTIONS: dict[str, Callable] = {"none": _none, "mask": _mask, "canny": _canny}


def check_preprocess(preprocess: str, what: str = "control image") -> None:
    """A known preprocessor whose libraries are installed (checked before any image is read)."""
    if preprocess not in _FUNCTIONS:
        raise ValueError(f"{what}: unknown preprocess {preprocess!r}; choose one of "
                         f"{', '.join(PREPROCESSORS)}")
    if preprocess == "canny":
        _opencv()


def control_image(image: Any, height: int, width: int, *, preprocess: str = "none",
                  channels: int = 3, low_threshold: int = CANNY_THRESHOLDS[0],
                  high_threshold: int = CANNY_THRESHOLDS[1],
                  what: str = "control image") -> np.ndarray:
    """`image` (a path, a PIL image, a uint8 array or a float array in [0, 1]) preprocessed, then
    resized to (height, width) as diffusers' control image processor does (PIL Lanczos) ->
    float32 (height, width, channels) in [0, 1]. Preprocessing runs at the image's own size."""
    check_preprocess(preprocess, what)
    if isinstance(image, np.ndarray) and image.dtype != np.uint8 and preprocess == "none":
        array = np.asarray(image, np.float32)
        if array.ndim == 2:
            array = array[..., None]
        if array.shape[:2] == (height, width) and array.shape[-1] == channels:
            if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
                raise ValueError(f"{what}: a float array must hold values in [0, 1]")
            return array  # already the drawn size: used as it is (no 8-bit rounding)
    from PIL import Image

    pil = _FUNCTIONS[preprocess](_as_pil(image, what), low_threshold, high_threshold)
    if channels == 3:
        pil = pil.convert("RGB")
    elif channels == 1:
        pil = pil.convert("L")
    else:
        raise ValueError(f"{what}: a {channels}-channel control image must be given as a float "
                         f"array of shape ({height}, {width}, {channels})")
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(pil, np.float32) / 255.0
    return array.reshape(height, width, channels)
