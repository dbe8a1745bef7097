"""What to draw (`Request`) and its host-side layout as the arrays the sampling program takes."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from sdjax.sampling import controls, loras
from sdjax.sampling.spec import SamplingSpec
from sdjax.text import prompts
from sdjax.text.conditioning import sdxl_time_ids
from sdjax.text.t5_tokenizer import T5Tokenizer, tokenize_weighted_t5


@dataclasses.dataclass
class Request:
    """What to draw. Lists are per image; a single value applies to every image."""
    prompt: str | Sequence[str]
    negative_prompt: Optional[str | Sequence[str]] = None
    seed: int = 0                      # image i gets seed + i
    num_images: int = 1
    cfg_scale: float | Sequence[float] = 7.5
    guidance_rescale: float | Sequence[float] = 0.0
    subseed: Optional[int] = None      # variation seed: image i gets subseed + i
    subseed_strength: float = 0.0
    init_image: Optional[np.ndarray] = None   # (H, W, 3) or (B, H, W, 3) in [-1, 1]
    mask: Optional[np.ndarray] = None         # (H, W) or (B, H, W) in {0, 1}, 1 = repaint
    # Inpainting: the init image is laid back over the result outside the mask, blurred by this many
    # pixels (a Gaussian radius, as the WebUI's "mask blur"), so pixels away from it stay exact.
    inpaint_overlay: bool = True
    mask_blur: float = 4.0
    noise: Optional[np.ndarray] = None        # (B, h, w, c): replaces the seeded noise (parity tests)
    # LoRAs applied to the whole request (every image, both guidance branches), before those the
    # prompts' `<lora:...>` tags name: `adapters.network.Weighted` adapters, or (name_or_path,
    # unet_weight[, te_weight]) that the Generator loads (a name is a file of its `lora_dir`).
    adapters: Sequence = ()
    # ControlNets (`sampling.controls.Control`): each with its control image(s), scale per image and
    # start/end; several add up. Their images and scales are data, the ControlNets themselves not.
    controls: Sequence = ()
    # Flux.1-dev: the guidance scale its transformer embeds (guidance distillation; diffusers'
    # `guidance_scale` of FluxPipeline). Ignored by models without a guidance embedding.
    embedded_guidance: float | Sequence[float] = 3.5
    # SD3: skip-layer guidance's scale per image, used when the spec names slg_layers.
    slg_scale: float | Sequence[float] = 2.8


MAX_SEED = 2 ** 32 - 1  # seeds are uint32, as PRNG keys take them


def image_seeds(seed: int, n: int, what: str = "seed") -> np.ndarray:
    """Seeds seed, seed + 1, ... seed + n - 1 as uint32 (what image i of a request draws from).
    A seed range outside uint32 is an error, never a silent wrap-around to other images' seeds."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {seed!r}")
    if seed < 0 or int(seed) + n - 1 > MAX_SEED:
        raise ValueError(f"{what} {seed} with {n} image(s) needs seeds {seed}..{int(seed) + n - 1}, "
                         f"outside 0..{MAX_SEED}")
    return (np.uint64(seed) + np.arange(n, dtype=np.uint64)).astype(np.uint32)


def _finite_per_image(value, n: int, name: str) -> np.ndarray:
    values = np.asarray(per_image(value, n, name), np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return values.astype(np.float32)


def prepare_batch(arch, tokenizers, request: Request, spec: SamplingSpec) -> dict:
    """Validate `request` against `spec` and `arch` (an Architecture), tokenize it with the model's
    `tokenizers` and lay out the batch arrays `program.generate_images` takes."""
    spec.validate(arch)
    n = request.num_images
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {n!r}")
    prompts_list, negatives, _ = prompt_texts(request)
    negative_given = request.negative_prompt is not None
    texts = prompts_list + negatives
    clip_tokenizers = [t for t in tokenizers if not isinstance(t, T5Tokenizer)]
    # One id tensor per CLIP encoder: their tokenizers differ in padding (SDXL's second pads with
    # "!"), the emphasis weights do not.
    per_encoder = [prompts.tokenize_batch(t, texts) for t in clip_tokenizers]
    chunks = max(ids.shape[1] for ids, _ in per_encoder)
    per_encoder = [prompts.tokenize_batch(t, texts, min_chunks=chunks) for t in clip_tokenizers]
    ids = np.stack([i for i, _ in per_encoder], axis=1)
    weights = per_encoder[0][1]
    batch = {
        "ids": ids[:n], "weights": weights[:n], "neg_ids": ids[n:], "neg_weights": weights[n:],
        "seeds": image_seeds(request.seed, n),
        "cfg_scale": _finite_per_image(request.cfg_scale, n, "cfg_scale"),
        "guidance_rescale": _finite_per_image(request.guidance_rescale, n, "guidance_rescale"),
    }
    if not 0.0 <= request.subseed_strength <= 1.0:
        raise ValueError(f"subseed_strength must be in [0, 1], got {request.subseed_strength!r}")
    if request.subseed is not None and request.subseed_strength > 0:
        batch["subseeds"] = image_seeds(request.subseed, n, "subseed")
        batch["subseed_strength"] = np.full((n,), request.subseed_strength, np.float32)
    if arch.flow:
        batch.update(_flow_inputs(arch, tokenizers, request, spec, texts))
    if arch.family == "sdxl":
        batch["time_ids"] = sdxl_time_ids(spec.height, spec.width, n)
        if not negative_given:
            batch["neg_zero"] = np.ones((n,), np.float32)
    if spec.controlnets or request.controls:
        batch.update(controls.control_arrays(tuple(request.controls), spec, n))
    if request.noise is not None:
        batch["noise"] = np.asarray(request.noise, np.float32)
    if spec.mode != "txt2img":
        if request.init_image is None:
            raise ValueError(f"mode {spec.mode!r} needs an init image")
        init = np.asarray(request.init_image, np.float32)
        init = np.broadcast_to(init, (n,) + init.shape[-3:]) if init.ndim == 3 else init
        if init.shape[1:3] != (spec.height, spec.width):
            raise ValueError(f"init image is {init.shape[2]}x{init.shape[1]} but the request is "
                             f"{spec.width}x{spec.height} (width x height)")
        batch["init_image"] = init
    if spec.mode == "inpaint":
        if request.mask is None:
            raise ValueError("mode 'inpaint' needs a mask")
        mask = np.asarray(request.mask, np.float32)
        mask = np.broadcast_to(mask, (n,) + mask.shape[-2:]) if mask.ndim == 2 else mask
        if mask.shape[1:] != (spec.height, spec.width):
            raise ValueError(f"mask is {mask.shape[2]}x{mask.shape[1]} but the image is "
                             f"{spec.width}x{spec.height} (width x height)")
        batch["mask"] = mask[..., None]
        if not (math.isfinite(request.mask_blur) and request.mask_blur >= 0):
            raise ValueError(f"mask_blur must be a finite radius >= 0, got {request.mask_blur!r}")
        batch["overlay"] = (np.stack([blur_mask(m, request.mask_blur) for m in mask])[..., None]
                            if request.inpaint_overlay else np.ones_like(batch["mask"]))
    return batch


def _flow_inputs(arch, tokenizers, request: Request, spec: SamplingSpec, texts: list[str]) -> dict:
    """T5 ids and emphasis weights (B, max_sequence_length) of prompts and negative prompts, Flux's
    embedded guidance and SD3's skip-layer guidance scales. An SD3 model without T5 gets zero ids:
    its T5 states are zeros whatever they are."""
    n = request.num_images
    length = spec.sequence_length(arch)
    t5 = next((t for t in tokenizers if isinstance(t, T5Tokenizer)), None)
    if t5 is None:
        ids, weights = np.zeros((len(texts), length), np.int32), np.ones((len(texts), length), np.float32)
    else:
        rows = [tokenize_weighted_t5(t5, text, length) for text in texts]
        ids = np.stack([r[0] for r in rows]).astype(np.int32)
        weights = np.stack([r[1] for r in rows]).astype(np.float32)
    out = {"t5_ids": ids[:n], "t5_weights": weights[:n], "neg_t5_ids": ids[n:],
           "neg_t5_weights": weights[n:]}
    if arch.family == "flux" and arch.transformer.guidance_embeds:
        out["embedded_guidance"] = _finite_per_image(request.embedded_guidance, n,
                                                     "embedded_guidance")
    if spec.slg_layers:
        out["slg_scale"] = _finite_per_image(request.slg_scale, n, "slg_scale")
    return out


def prompt_texts(request: Request) -> tuple[list[str], list[str], tuple[prompts.NamedLora, ...]]:
    """(prompt per image, negative prompt per image, the LoRAs their tags name): the texts without
    their `<lora:...>` tags, as the tokenizer sees them. A LoRA changes the model, and a request is
    one program call with one set of params, so every image's prompt must name the same LoRAs (and
    every negative prompt the same); a LoRA named in a negative prompt applies to the whole model
    too."""
    n = request.num_images
    found = []
    texts = {}
    for what, value in (("prompt", request.prompt),
                        ("negative_prompt", request.negative_prompt or "")):
        stripped, sets = [], []
        for text in per_image(value, n, what):
            if text not in texts:
                texts[text] = prompts.extract_loras(text)
            stripped.append(texts[text][0])
            sets.append(texts[text][1])
        for i, named in enumerate(sets):
            if named != sets[0]:
                raise ValueError(
                    f"{what} {i} names LoRAs {_tags(named)} but {what} 0 names {_tags(sets[0])}: a "
                    f"request is one program call with one set of model weights for all its "
                    f"images; draw prompts with other LoRAs as separate requests")
        found.append((stripped, sets[0]))
    (prompt_list, positive), (negatives, negative) = found
    return prompt_list, negatives, positive + negative


def _tags(named: Sequence[prompts.NamedLora]) -> str:
    return " ".join(f"<lora:{n.name}:{n.text_encoder:g}:{n.unet:g}>" for n in named) or "(none)"


def request_loras(request: Request) -> tuple:
    """The LoRAs `request` applies: its `adapters` entries, then those its prompts' tags name
    (`Weighted` adapters and `NamedLora`s, which the Generator loads)."""
    if isinstance(request.adapters, (str, bytes)) or not isinstance(request.adapters, (tuple, list)):
        raise ValueError(f"Request.adapters must be a list of LoRAs, got {request.adapters!r}")
    return tuple(loras.lora_entry(e) for e in request.adapters) + prompt_texts(request)[2]


def blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """(H, W) mask in [0, 1] -> Gaussian-blurred by `radius` pixels (PIL's filter, as the WebUI),
    then 1 wherever the mask is: the overlay's weight of the drawn image."""
    from PIL import Image, ImageFilter

    if radius == 0:
        return mask.astype(np.float32)
    image = Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8), mode="L")
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0
    return np.maximum(blurred, mask).astype(np.float32)


def pad_batch(batch: dict, rows: int, seed: int) -> dict:
    """`batch` padded to `rows` images (to fill every device): extra seeds continue the request's,
    other arrays repeat their last row. Padding never changes the real images, since each image
    depends only on its own seed."""
    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])

    return {k: image_seeds(seed, rows) if k == "seeds" else pad(v) for k, v in batch.items()}


def per_image(value, n: int, name: str) -> list:
    """A single value (or one-element list) repeated for n images, or a list of exactly n."""
    if isinstance(value, (str, int, float, np.floating, np.integer)):
        return [value] * n
    values = list(value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but num_images is {n}")
    return values
