"""Image metrics for ablations: CLIP score (text-image agreement) and diversity across seeds.

CLIP score (Hessel et al. 2021, as torchmetrics reports it): 100 · max(cos(image, text), 0), the
cosine between a CLIPModel's projected image and text embeddings. Images go through CLIP's own
preprocessing (transformers' CLIPImageProcessor): shorter side resized to the model's input size
with PIL bicubic, centre crop, scale to [0, 1], OpenAI mean/std.

Diversity: the mean over all pairs of images of their RMS pixel distance in [0, 1] RGB,
sqrt(mean((a - b)²)). 0 when every seed gives the same picture, 1 for black vs white; random
uniform images are ~0.41 apart. Pixel distance rather than 1 − SSIM because it needs no window
size, is exact to test, and in an ablation it answers the question asked: did the seeds stop
mattering (mode collapse at high guidance)?
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax.models.clip import CLIPConfig, CLIPModel
from sdjax.text.tokenizer import CLIPTokenizer
from sdjax.weights import clip as clip_weights
from sdjax.weights.common import WeightsError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- preprocessing ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipPreprocessing:
    """CLIPImageProcessor's settings: resize the shorter side to `shortest_edge` (bicubic), crop
    the centre `crop_size` (height, width), then (x/255 − mean)/std."""
    shortest_edge: int
    crop_size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def for_config(cls, config: CLIPConfig) -> "ClipPreprocessing":
        size = config.vision.image_size
        return cls(shortest_edge=size, crop_size=(size, size))

    @classmethod
    def from_preprocessor_config(cls, raw: dict, config: CLIPConfig,
                                 where: str = "preprocessor_config.json") -> "ClipPreprocessing":
        """From a transformers `preprocessor_config.json` dict; what it omits is CLIP's default."""
        default = cls.for_config(config)
        size = raw.get("size", default.shortest_edge)
        crop = raw.get("crop_size", default.crop_size[0])
        try:
            shortest = int(size["shortest_edge"] if isinstance(size, dict) else size)
            crop_size = ((int(crop["height"]), int(crop["width"])) if isinstance(crop, dict)
                         else (int(crop), int(crop)))
        except (KeyError, TypeError, ValueError) as err:
            raise WeightsError(f"{where}: unreadable size/crop_size ({err!r})") from None
        if crop_size != (config.vision.image_size,) * 2:
            raise WeightsError(f"{where}: crop_size {crop_size} does not match the vision model's "
                               f"image_size {config.vision.image_size}")
        return cls(shortest_edge=shortest, crop_size=crop_size,
                   mean=tuple(float(m) for m in raw.get("image_mean", OPENAI_CLIP_MEAN)),
                   std=tuple(float(s) for s in raw.get("image_std", OPENAI_CLIP_STD)))


def clip_preprocess(images: np.ndarray, preprocessing: ClipPreprocessing) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, crop_h, crop_w, 3) CLIP pixel values."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    out = []
    crop_h, crop_w = preprocessing.crop_size
    for image in images:
        h, w = image.shape[:2]
        # As transformers: shorter side -> shortest_edge, longer -> int(size * long / short).
        short, long = (w, h) if w <= h else (h, w)
        new_short = preprocessing.shortest_edge
        new_long = int(new_short * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        resized = image
        if (new_h, new_w) != (h, w):
            resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        if top < 0 or left < 0:
            raise ValueError(f"image resized to {new_w}x{new_h} is smaller than the CLIP crop "
                             f"{crop_w}x{crop_h}")
        out.append(resized[top:top + crop_h, left:left + crop_w])
    pixels = np.stack(out).astype(np.float32) / 255.0
    return (pixels - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std,
                                                                              np.float32)


# --- CLIP score ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _clip_cosine(config: CLIPConfig, params: dict, ids: jax.Array, pixels: jax.Array) -> jax.Array:
    model = CLIPModel(config)
    text = model.apply({"params": params}, ids, method=CLIPModel.get_text_features)
    image = model.apply({"params": params}, pixels, method=CLIPModel.get_image_features)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    return jnp.sum(text * image, axis=-1)


def clip_similarity(clip_model_config: CLIPConfig, clip_params: dict, tokenizer: CLIPTokenizer,
                    images: np.ndarray, prompts: str | Sequence[str], *,
                    preprocessing: Optional[ClipPreprocessing] = None) -> np.ndarray:
    """Per image: cos(image_i, prompt_i) of the projected CLIP embeddings, float32 (B,).

    images: uint8 (B, H, W, 3), any size (CLIP preprocessing resizes and crops them);
    prompts: one per image, or one for all. Prompts longer than the text model's context are
    truncated, as CLIP's tokenizer does.
    """
    images = np.asarray(images)
    n = images.shape[0] if images.ndim == 4 else 0
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"clip_score: {len(prompts)} prompts for {n} images "
                         f"(images shape {images.shape})")
    preprocessing = preprocessing or ClipPreprocessing.for_config(clip_model_config)
    pixels = clip_preprocess(images, preprocessing)
    ids = tokenizer(prompts, max_length=clip_model_config.text.max_position_embeddings)
    cosine = _clip_cosine(clip_model_config, clip_params, jnp.asarray(ids), jnp.asarray(pixels))
    return np.asarray(cosine, np.float32)


def clip_score(clip_model_config: CLIPConfig, clip_params: dict, tokenizer: CLIPTokenizer,
               images: np.ndarray, prompts: str | Sequence[str], *,
               preprocessing: Optional[ClipPreprocessing] = None) -> np.ndarray:
    """Per image: 100 · max(cos(image_i, prompt_i), 0), float32 (B,); the CLIP score of a set
    is the mean of these. Arguments as `clip_similarity`."""
    cosine = clip_similarity(clip_model_config, clip_params, tokenizer, images, prompts,
                             preprocessing=preprocessing)
    return np.maximum(100.0 * cosine, 0.0).astype(np.float32)


@dataclasses.dataclass
class ClipScorer:
    """A loaded CLIP model with its tokenizer and preprocessing: `scorer(images, prompts)`."""
    config: CLIPConfig
    params: dict
    tokenizer: CLIPTokenizer
    preprocessing: ClipPreprocessing
    source: str = ""

    def __call__(self, images: np.ndarray, prompts: str | Sequence[str]) -> np.ndarray:
        return clip_score(self.config, self.params, self.tokenizer, images, prompts,
                          preprocessing=self.preprocessing)


def load_clip_scorer(path: str | os.PathLike, dtype: Any = None) -> ClipScorer:
    """A transformers CLIPModel folder (config.json with text_config/vision_config, safetensors
    weights, optionally the tokenizer and preprocessor_config.json of a CLIPProcessor) or a native
    sdjax CLIP folder (`weights.clip.save_clip_native`). Without tokenizer files the OpenAI vocabulary is
    used."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model {os.fspath(path)!r} is not a folder")
    if (folder / clip_weights.NATIVE_CLIP_MANIFEST).is_file():
        config, params = clip_weights.load_clip_native(folder, dtype)
        tokenizer_dir = folder / "tokenizer"
    elif (folder / "config.json").is_file():
        config, params = clip_weights.load_clip_folder(folder, dtype=dtype)
        tokenizer_dir = folder
    else:
        raise WeightsError(f"{folder}: neither a transformers CLIPModel folder (config.json) nor "
                           f"an sdjax CLIP folder ({clip_weights.NATIVE_CLIP_MANIFEST})")
    has_tokenizer = any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    tokenizer = (CLIPTokenizer.from_pretrained(tokenizer_dir) if has_tokenizer
                 else CLIPTokenizer.default())
    preprocessing = ClipPreprocessing.for_config(config)
    processor_file = folder / "preprocessor_config.json"
    if processor_file.is_file():
        preprocessing = ClipPreprocessing.from_preprocessor_config(
            json.loads(processor_file.read_text()), config, where=str(processor_file))
    return ClipScorer(config=config, params=params, tokenizer=tokenizer,
                      preprocessing=preprocessing, source=str(folder))


# --- diversity -------------------------------------------------------------------------------------

def pairwise_distances(images: np.ndarray) -> np.ndarray:
    """(N, N) RMS distances between uint8 (N, H, W, C) images, in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    flat = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
    n = flat.shape[0]
    out = np.zeros((n, n), np.float64)
    for i, j in itertools.combinations(range(n), 2):
        out[i, j] = out[j, i] = np.sqrt(np.mean(np.square(flat[i] - flat[j]), dtype=np.float64))
    return out


def diversity(images: np.ndarray) -> float:
    """Mean RMS pixel distance over all pairs of uint8 (N, H, W, C) images (N >= 2): the images of
    one prompt across seeds. 0 = identical images; 1 = black vs white."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 images (N, H, W, C), got shape "
                         f"{images.shape}")
    n = images.shape[0]
    return float(pairwise_distances(images)[np.triu_indices(n, 1)].mean())
