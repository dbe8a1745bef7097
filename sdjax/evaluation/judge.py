"""A deterministic judge of shapes-world images: does this picture show what the prompt says?

Classical image analysis only, tolerant of what generated images get wrong at the margins
(noise, blur, soft edges, slight colour shifts):
  background  the palette colour most of the image border is closest to;
  objects     connected regions (4-connected) far from the background colour, specks dropped,
              split in two where two colours touch;
  colour      palette colour nearest the median of a region's most saturated pixels;
  shape       best soft IoU between the region's coverage map (how far each pixel lies from the
              background towards the object colour) and each shape (the extension's heart too),
              sharp or slightly blurred, drawn into the box that the coverage's moments imply for
              that shape;
  size        side implied by the covered area and the shape's fill ratio, against the geometric
              mean of the small and large sides;
  position    centre of the fitted box: "center" inside the middle square, otherwise the
              dominant direction from the image centre.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Union

import numpy as np

from sdjax.data import shapes
from sdjax.data.shapes import Scene

ATTRIBUTES = ("colour", "shape", "position", "size", "background", "count")

_PALETTE_NAMES = tuple(shapes.COLOURS)
_PALETTE = np.asarray([shapes.COLOURS[n] for n in _PALETTE_NAMES], np.float32)
# RGB distance from the background above which a pixel counts as foreground: well above noise
# (sigma 8/255 per channel gives ~14 on average) and well below the closest palette pair (~140).
_FOREGROUND_DISTANCE = 50.0
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5,
         "cross": 2 * shapes.CROSS_ARM - shapes.CROSS_ARM ** 2}
_SIZE_THRESHOLD = float(np.sqrt(shapes.SIZE_FRACTION["small"] * shapes.SIZE_FRACTION["large"]))
# Half-side of the "center" square, a fraction of the image side: halfway to the side anchors.
_CENTER_HALF = 0.125
# A pixel this close to a palette colour is unmistakably that colour (not an edge mixture).
_PURE_DISTANCE = 50.0
# Blurs (Gaussian sigma, fraction of the image side) the shape fit tries: sharp up to ~1.5 px at 32.
_BLURS = (0.0, 0.016, 0.032, 0.047)
# Regions smaller than a quarter of the smallest shape (a small triangle) are specks.
_MIN_AREA_FRACTION = 0.25 * _FILL["triangle"] * shapes.SIZE_FRACTION["small"] ** 2



def _shape_moments(resolution: int = 256):
    """Per shape (the extension's too): (std x, std y) of its area as fractions of its box, its
    centroid's offset from the box centre, and the fraction of its box it fills, measured on a
    fine drawing."""
    spread, offset, fill = {}, {}, {}
    ys, xs = (np.mgrid[0:resolution, 0:resolution] + 0.5) / resolution - 0.5
    for name in shapes.ALL_SHAPES:
        cov = shapes.shape_coverage(name, (0, 0, resolution, resolution), resolution, resolution)
        total = cov.sum()
        fill[name] = float(cov.mean())
        mx, my = (cov * xs).sum() / total, (cov * ys).sum() / total
        spread[name] = (float(np.sqrt((cov * (xs - mx) ** 2).sum() / total)),
                        float(np.sqrt((cov * (ys - my) ** 2).sum() / total)))
        offset[name] = (float(mx), float(my))
    return spread, offset, fill


_SPREAD, _CENTROID_OFFSET, _MEASURED_FILL = _shape_moments()
# A heart's area has no closed form: its fill ratio is measured (the base shapes' stay exact).
_FILL.update({name: _MEASURED_FILL[name] for name in shapes.EXTRA_SHAPES})


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    rgb: tuple[float, float, float]  # estimated object colour
    area: float  # covered area in pixels (soft)
    box: tuple[float, float, float, float]  # fitted (x0, y0, x1, y1) of `shape`, in pixels
    shape_scores: dict  # shape -> soft IoU with that shape's template


@dataclasses.dataclass(frozen=True)
class Detection:
    background: str
    background_rgb: tuple[float, float, float]
    objects: tuple[DetectedObject, ...]  # largest first


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into the palette of the colour nearest each (..., 3) RGB value."""
    d = ((rgb[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = not in mask, 1..n) by label propagation."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.int64)
    labels = padded[1:-1, 1:-1]
    labels[...] = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        grown = np.maximum(np.maximum(padded[:-2, 1:-1], padded[2:, 1:-1]),
                           np.maximum(padded[1:-1, :-2], padded[1:-1, 2:]))
        grown = np.maximum(grown, labels) * mask
        if np.array_equal(grown, labels):
            break
        labels[...] = grown
    uniq, inverse = np.unique(np.concatenate([[0], labels.ravel()]), return_inverse=True)
    return inverse[1:].reshape(h, w), len(uniq) - 1


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    x = np.arange(n, dtype=np.float32)
    k = np.exp(-0.5 * ((x[:, None] - x[None]) / sigma) ** 2)
    return (k / k.sum(1, keepdims=True)).astype(np.float32)


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.05:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < _CENTER_HALF:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def detect(image: np.ndarray) -> Detection:
    """Find the background and the objects of a uint8 (H, W, 3) shapes-world image."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"judge expects a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    img = image.astype(np.float32)

    ring = max(1, round(min(h, w) / 32))
    border = np.concatenate([img[:ring].reshape(-1, 3), img[-ring:].reshape(-1, 3),
                             img[:, :ring].reshape(-1, 3), img[:, -ring:].reshape(-1, 3)])
    votes = _nearest_colour(border)
    bg_index = int(np.bincount(votes, minlength=len(_PALETTE)).argmax())
    bg = np.median(border[votes == bg_index], axis=0)

    dist = np.linalg.norm(img - bg, axis=-1)
    foreground = dist > _FOREGROUND_DISTANCE
    labels, n = _components(foreground)
    min_area = max(2.0, _MIN_AREA_FRACTION * h * w)
    regions = []
    for k in range(1, n + 1):
        region = labels == k
        if region.sum() >= min_area:
            regions += _split_by_colour(img, bg, bg_index, region, min_area)
    objects = [_describe(img, bg, dist, region, foreground & ~region) for region in regions]
    objects.sort(key=lambda o: -o.area)
    return Detection(_PALETTE_NAMES[bg_index], tuple(float(c) for c in bg), tuple(objects))


def _split_by_colour(img, bg, bg_index, region, min_area) -> list[np.ndarray]:
    """Split a region holding two objects of different colours that touch (blur, or a model's
    imprecision, can bridge them). A colour counts when enough pixels are close to it; edge pixels,
    mixed with the background, are not, so an edge never passes for a third colour."""
    pixels = img[region]
    nearest = _nearest_colour(pixels)
    pure = np.linalg.norm(pixels - _PALETTE[nearest], axis=-1) < _PURE_DISTANCE
    counts = np.bincount(nearest[pure], minlength=len(_PALETTE))
    counts[bg_index] = 0  # background showing through an edge is not an object
    present = np.nonzero(counts >= min_area)[0]
    if len(present) < 2:
        return [region]
    # Each pixel goes to the colour whose background -> colour segment passes closest.
    gaps = []
    for c in present:
        axis = np.median(pixels[pure & (nearest == c)], axis=0) - bg
        t = np.clip((pixels - bg) @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)
        gaps.append(np.linalg.norm(pixels - bg - t[:, None] * axis, axis=-1))
    owner = np.argmin(gaps, axis=0)
    parts = []
    for i in range(len(present)):
        part = np.zeros_like(region)
        part[region] = owner == i
        if part.sum() >= min_area:
            parts.append(part)
    return parts or [region]


def _describe(img, bg, dist, region, others) -> DetectedObject:
    h, w, _ = img.shape
    d = dist[region]
    # The region's most saturated pixels carry its colour; its edges are mixed with the background.
    core = d >= 0.8 * np.percentile(d, 95)
    rgb = np.median(img[region][core], axis=0)
    colour = _PALETTE_NAMES[int(_nearest_colour(rgb))]

    # Coverage: how far each pixel has moved from the background towards the object colour.
    # Soft edges just outside the thresholded region count, other objects' pixels do not.
    reach = max(1, round(min(h, w) / 32))  # soft edges widen with resolution
    grown, fenced = region, others
    for _ in range(2 * reach):
        grown = _dilate(grown)
    for _ in range(reach):
        fenced = _dilate(fenced)
    near = (grown & ~fenced) | region
    axis = rgb - bg
    cover = np.clip(((img - bg) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    cover = np.where(near, cover, 0.0).astype(np.float32)
    area = float(cover.sum())

    # Each hypothesis (shape, blur) implies a box from the coverage's centroid and spread (moments
    # are sub-pixel and robust to soft edges): draw it, blur it, and keep the best fit. Trying a
    # few blurs keeps a blurred square from looking more like a sharp circle than a sharp square.
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    weight = max(area, 1e-6)
    mx, my = float((cover * xs).sum() / weight), float((cover * ys).sum() / weight)
    vx = float((cover * (xs - mx) ** 2).sum() / weight)
    vy = float((cover * (ys - my) ** 2).sum() / weight)
    scores, boxes = {}, {}
    for name in shapes.ALL_SHAPES:
        (rx, ry), (ox, oy) = _SPREAD[name], _CENTROID_OFFSET[name]
        for blur in _BLURS:
            sigma = blur * np.sqrt(h * w)
            # A blur adds its variance; pixels add that of a unit box (1/12).
            bw = max(np.sqrt(max(vx - sigma ** 2 - 1 / 12, 0.0)) / rx, 1.0)
            bh = max(np.sqrt(max(vy - sigma ** 2 - 1 / 12, 0.0)) / ry, 1.0)
            cx, cy = mx - ox * bw, my - oy * bh
            box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
            template = _gaussian_blur(shapes.shape_coverage(name, box, h, w), sigma) * near
            score = float(np.minimum(cover, template).sum()
                          / max(float(np.maximum(cover, template).sum()), 1e-6))
            if score > scores.get(name, -1.0):
                scores[name], boxes[name] = score, box
    shape = max(shapes.ALL_SHAPES, key=lambda s: scores[s])
    box = boxes[shape]

    side = np.sqrt(area / _FILL[shape]) / np.sqrt(h * w)
    size = "large" if side >= _SIZE_THRESHOLD else "small"
    position = _position((box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h)
    return DetectedObject(colour, shape, size, position, tuple(float(c) for c in rgb), area,
                          box, scores)


# Colour names an object first (two objects never share one), then shape, position, size: a red
# circle on the right is the prompt's red circle misplaced, not its blue circle recoloured.
_MATCH_WEIGHTS = {"colour": 8, "shape": 4, "position": 2, "size": 1}


def _match_score(want: shapes.ShapeAttrs, got: DetectedObject) -> int:
    return sum(w for a, w in _MATCH_WEIGHTS.items()
               if getattr(want, a) is None or getattr(want, a) == getattr(got, a))


def judge(image: np.ndarray, prompt_or_scene: Union[str, Scene]) -> dict[str, bool]:
    """Check `image` (uint8 HxWx3) against a caption or a `Scene`.

    Returns {colour, shape, position, size, background, count, all_correct} -> bool. Attributes
    the prompt leaves out (e.g. no size) are True. Expected objects are paired with detected
    ones so that the most attributes agree (colour weighing most); an expected object with no
    partner fails them all.
    """
    if isinstance(prompt_or_scene, str):
        scene = shapes.parse_caption(prompt_or_scene)
    elif isinstance(prompt_or_scene, Scene):
        scene = prompt_or_scene
    else:
        raise TypeError(f"judge takes a caption or a Scene, got {type(prompt_or_scene).__name__}")
    found = detect(image)

    wanted = scene.objects
    candidates = found.objects[:8]  # the largest; more would only be clutter
    best, best_score = None, -1
    # Pad with None so that missing objects can be left unmatched.
    slots = list(range(len(candidates))) + [None] * len(wanted)
    for assignment in itertools.permutations(slots, len(wanted)):
        score = sum(_match_score(want, candidates[i]) for want, i in zip(wanted, assignment)
                    if i is not None)
        if score > best_score:
            best, best_score = assignment, score

    result = {}
    for attr in ("colour", "shape", "position", "size"):
        result[attr] = all(
            getattr(want, attr) is None
            or (i is not None and getattr(candidates[i], attr) == getattr(want, attr))
            for want, i in zip(wanted, best))
    result["background"] = scene.background is None or found.background == scene.background
    result["count"] = len(candidates) == len(wanted)
    result["all_correct"] = all(result[a] for a in ATTRIBUTES)
    return result
