"""Images in and out: arrays <-> PIL, grids with labelled axes, PNG metadata.

Model-side images are float NHWC in [-1, 1]; files and PIL are uint8 RGB.
"""
from __future__ import annotations

import io
import math
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from sdjax import runs


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats (any leading dims, channels last) -> uint8, rounding as the reference does."""
    images = np.asarray(images, dtype=np.float32)
    return np.round(np.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float32) / 127.5 - 1.0


def load_image(path: str | os.PathLike, size: Optional[tuple[int, int]] = None, *,
               what: str = "image") -> np.ndarray:
    """An image file -> float32 HWC in [-1, 1], RGB; resized to (height, width) if given."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {os.fspath(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.LANCZOS)
            return from_uint8(np.asarray(image))
    except OSError as err:
        raise ValueError(f"{what} {os.fspath(path)!r} cannot be read as an image ({err})") from None


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """A mask file -> float32 (H, W) in {0, 1}; white (1) marks what is repainted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask {os.fspath(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            if image.size != (size[1], size[0]):
                raise ValueError(f"mask {os.fspath(path)!r} is {image.size[0]}x{image.size[1]} but "
                                 f"the image is {size[1]}x{size[0]} (width x height)")
            return (np.asarray(image.convert("L"), dtype=np.float32) >= 128).astype(np.float32)
    except OSError as err:
        raise ValueError(f"mask {os.fspath(path)!r} cannot be read as an image ({err})") from None


def save_png(image: np.ndarray, path: str | os.PathLike, parameters: Optional[str] = None) -> None:
    """Write uint8 HWC as PNG; `parameters` goes in a `parameters` text chunk (the WebUI's
    convention, which image viewers and the WebUI's PNG-info tab read back)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    encoded = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(encoded, format="PNG", pnginfo=info)
    # A crash never leaves a half-written image under the final name.
    runs.write_atomically(path, encoded.getvalue())


def read_parameters(path: str | os.PathLike) -> Optional[str]:
    with Image.open(path) as image:
        return image.text.get("parameters")


def grid(images: Sequence[np.ndarray], rows: Optional[int] = None, *,
         row_labels: Optional[Sequence[str]] = None, col_labels: Optional[Sequence[str]] = None,
         pad: int = 2) -> np.ndarray:
    """Tile uint8 HWC images into rows x cols (row-major), with optional axis labels (an X/Y plot)."""
    images = [np.asarray(i) for i in images]
    if not images:
        raise ValueError("grid of no images")
    n = len(images)
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    h, w = images[0].shape[:2]
    font = ImageFont.load_default()
    left = (max(_text_width(font, t) for t in row_labels) + 8) if row_labels else 0
    top = 18 if col_labels else 0
    canvas = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), "white")
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        canvas.paste(Image.fromarray(image), (left + pad + c * (w + pad), top + pad + r * (h + pad)))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels or ()):
        draw.text((left + pad + c * (w + pad) + 2, 3), str(label), fill="black", font=font)
    for r, label in enumerate(row_labels or ()):
        draw.text((4, top + pad + r * (h + pad) + h // 2 - 6), str(label), fill="black", font=font)
    return np.asarray(canvas)


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(str(text))
    return right - left


def format_parameters(prompt: str, negative_prompt: str, settings: dict) -> str:
    """The WebUI's `parameters` text: prompt, negative prompt, then `Key: value, ...`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)
