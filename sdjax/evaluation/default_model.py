"""The embedded default model's evaluation (experiments/evaluate_default_model.py, and the last
stage of its build):

  phrasings           every phrasing the shapes grammar allows (`shapes.PHRASINGS`: one or two
                      objects; size, position and background each named or left out; "on a
                      COLOUR background" or ", COLOUR background"), `prompts_per_phrasing`
                      prompts each (`shapes.phrased_prompts`, drawn over the whole world), each
                      drawn with `seeds` seeds at the generation settings (configs/shapes.py) and
                      checked by `judge` on what the prompt says; per phrasing the share of
                      drawings with every attribute right and each attribute's share.
                      Targets: >= 90% all-correct in every single-object phrasing, >= 80% over
                      the two-object phrasings (both objects' colour and shape, and their
                      left/right or top/bottom relation where the prompt names it), and >= 90%
                      of the shapes right in prompts that name a small object.
                      The figures come from the "report" prompts; the "selection" prompts, a
                      disjoint set (`shapes.prompt_set`), are the ones models and settings are
                      chosen on (the ablation studies, the CFG default).
  CLIP zero-shot      for held-out single-object images, each attribute (colour, shape, size,
                      position, background) is predicted by the caption, among the true caption
                      with that attribute set to each possible value, that the shapes CLIP ranks
                      first; the fraction of right predictions (target >= 95%). The CLIP never
                      saw the held-out (colour, shape) pairs: this measures composition.
  VAE PSNR            mean per-image PSNR of posterior-mean reconstructions of held-out images
                      (target >= 30 dB)
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax import DEFAULT_MODEL
from sdjax import images as images_lib
from sdjax.data import shapes
from sdjax.data.shapes_dataset import example_batch
from sdjax.evaluation.judge import ATTRIBUTES, judge
from sdjax.evaluation.metrics import load_clip_scorer
from sdjax.models.clip import CLIPModel
from sdjax.models.vae import AutoencoderKL
from sdjax.sampling.generate import spec_from_config
from sdjax.sampling.generator import Generator
from sdjax.sampling.requests import Request
from sdjax.weights.pretrained import Pretrained, load_pretrained

TARGETS = {"single_object_worst_phrasing_accuracy": 0.90, "two_object_accuracy": 0.80,
           "small_shape_accuracy": 0.90, "clip_zero_shot_accuracy": 0.95, "vae_psnr_db": 30.0}
PROMPTS_PER_PHRASING = 12
SEEDS = 4
CLIP_ATTRIBUTES = ("colour", "shape", "size", "position", "background")


# --- VAE -------------------------------------------------------------------------------------------

def vae_psnr(model: Pretrained, images: np.ndarray, batch_size: int = 64) -> dict:
    """PSNR (dB, 8-bit) of posterior-mean reconstructions of uint8 (N, S, S, 3) `images`."""
    vae = AutoencoderKL(model.vae_config)

    @jax.jit
    def reconstruct(params, pixels):
        posterior = vae.apply({"params": params}, pixels, method=AutoencoderKL.encode)
        return vae.apply({"params": params}, posterior.mean, method=AutoencoderKL.decode)

    out = []
    for i in range(0, len(images), batch_size):
        pixels = images[i:i + batch_size].astype(np.float32) / 127.5 - 1.0
        recon = np.asarray(reconstruct(model.params["vae"], pixels))
        out.append(np.clip(np.round((recon + 1.0) * 127.5), 0, 255))
    recon = np.concatenate(out)
    mse = ((recon - images.astype(np.float32)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    return {"vae_psnr_db": float(psnr.mean()), "vae_psnr_min_db": float(psnr.min()),
            "vae_images": int(len(images))}


def latent_std(model: Pretrained, images: np.ndarray, batch_size: int = 64) -> float:
    """Std of the unscaled posterior means of `images`: 1 / this is the latent scaling factor."""
    vae = AutoencoderKL(model.vae_config)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode).mean)
    means = [np.asarray(encode(model.params["vae"],
                               images[i:i + batch_size].astype(np.float32) / 127.5 - 1.0))
             for i in range(0, len(images), batch_size)]
    return float(np.concatenate(means).std())


# --- CLIP ------------------------------------------------------------------------------------------

def _variants(scene: shapes.Scene, attribute: str) -> list:
    """Scenes equal to the single-object `scene` but for `attribute`, the true one first."""
    obj = scene.objects[0]
    if attribute == "background":
        values = [c for c in shapes.COLOURS if c != obj.colour]
        return [scene] + [dataclasses.replace(scene, background=v) for v in values
                          if v != scene.background]
    allowed = {"colour": [c for c in shapes.COLOURS if c != scene.background],
               "shape": shapes.SHAPES, "size": shapes.SIZES, "position": shapes.POSITIONS}
    current = getattr(obj, attribute)
    return [scene] + [dataclasses.replace(scene, objects=(dataclasses.replace(obj, **{attribute: v}),))
                      for v in allowed[attribute] if v != current]


def clip_zero_shot(config, params, tokenizer, images: np.ndarray, scenes: Sequence) -> dict:
    """Zero-shot attribute accuracy of a CLIP (sdjax CLIPModel params) on single-object scenes.
    Pixels go in as the training data loader gives them: [-1, 1]."""
    model = CLIPModel(config)
    text_fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids,
                                                 method=CLIPModel.get_text_features))
    image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                method=CLIPModel.get_image_features))

    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    image_features = unit(np.concatenate([
        image_fn(params, jnp.asarray(images[i:i + 128].astype(np.float32) / 127.5 - 1.0))
        for i in range(0, len(images), 128)]))
    captions = sorted({shapes.caption(v) for s in scenes for a in CLIP_ATTRIBUTES
                       for v in _variants(s, a)})
    index = {c: i for i, c in enumerate(captions)}
    text_features = unit(np.concatenate([
        text_fn(params, jnp.asarray(tokenizer(captions[i:i + 256])))
        for i in range(0, len(captions), 256)]))
    right = {a: [] for a in CLIP_ATTRIBUTES}
    for feature, scene in zip(image_features, scenes):
        for attribute in CLIP_ATTRIBUTES:
            rows = [index[shapes.caption(v)] for v in _variants(scene, attribute)]
            right[attribute].append(int(np.argmax(text_features[rows] @ feature) == 0))
    per_attribute = {a: float(np.mean(r)) for a, r in right.items()}
    return {"clip_zero_shot_accuracy": float(np.mean([np.mean(r) for r in right.values()])),
            "clip_zero_shot_per_attribute": per_attribute, "clip_images": int(len(images))}


# --- the diffusion model ---------------------------------------------------------------------------

def generate_and_judge(model: Pretrained, prompts: Sequence[str],
                       config: ml_collections.ConfigDict, *, seed: int = 0,
                       batch_size: int = 56, generator: Optional[Generator] = None,
                       adapters: Sequence = (), judged: Optional[Sequence] = None,
                       controls: Sequence = ()) -> tuple[dict, np.ndarray, list]:
    """Draw each prompt once at `config`'s settings (a configs/shapes.py config) and judge it.
    Returns (accuracy, per-attribute rates and seconds per image; the images, uint8; the
    verdicts). `generator`: one of `model` to reuse (its compiled programs with it); `adapters`:
    LoRAs applied to every image (`Request.adapters`); `judged`: what each image is judged
    against instead of its prompt (captions or Scenes: a textual-inversion token's meaning);
    `controls`: ControlNets (`sampling.Control`) whose `image` and `scale` are lists with one entry
    per prompt."""
    batch_size = min(batch_size, len(prompts))
    spec = dataclasses.replace(spec_from_config(config), progress=False, microbatch=batch_size)
    generator = generator or Generator(model)
    drawn = []
    started, timed = None, 0
    for first in range(0, len(prompts), batch_size):
        def take(values):  # this chunk's entries, the last repeated to keep one compiled program
            values = list(values[first:first + batch_size])
            return values + [values[-1]] * (batch_size - len(values))

        chunk = take(prompts)
        chunk_controls = [dataclasses.replace(c, image=take(c.image), scale=take(c.scale))
                          for c in controls]
        out = generator(Request(prompt=chunk, num_images=len(chunk), seed=seed + first,
                                cfg_scale=float(config.cfg_scale), adapters=tuple(adapters),
                                controls=chunk_controls),
                        spec)
        if started is None:  # the first call compiles
            started = time.perf_counter()
        else:
            timed += len(chunk)
        drawn.append(images_lib.to_uint8(out["images"]))
    elapsed = time.perf_counter() - started
    images = np.concatenate(drawn)[:len(prompts)]
    verdicts = [judge(image, truth) for image, truth in zip(images, judged or prompts)]
    result = {"accuracy": float(np.mean([v["all_correct"] for v in verdicts])),
              "per_attribute": {a: float(np.mean([v[a] for v in verdicts])) for a in ATTRIBUTES},
              "prompts": len(prompts),
              "seconds_per_image": elapsed / timed if timed else None}
    return result, images, verdicts


def spread_subset(prompts: Sequence[str], count: int) -> list:
    """`count` of `prompts` spread evenly over them (all of them for 0): a quick evaluation's."""
    if not count:
        return list(prompts)
    return list(prompts[::max(1, len(prompts) // count)][:count])


def evaluate_phrasings(model: Pretrained, config: ml_collections.ConfigDict, *,
                       prompt_set: str = "report", prompts_per_phrasing: int = PROMPTS_PER_PHRASING,
                       seeds: int = SEEDS, generator: Optional[Generator] = None
                       ) -> tuple[dict, np.ndarray]:
    """The phrasing figures of the module docstring at `config`'s settings, on `prompt_set`'s
    prompts; also returns a grid of the first seed's drawings, two prompts per phrasing (one row
    per three phrasings; one prompt each when there is one). Prompt k of a phrasing is drawn with seeds base + k + j * n for
    j < `seeds` (n prompts in all, base 0): fixed, and different for every drawing."""
    phrasings = shapes.PHRASINGS
    prompts = [p for phrasing in phrasings for p in shapes.phrased_prompts(
        phrasing, prompts_per_phrasing, of_set=prompt_set)]
    drawn, images, verdicts = generate_and_judge(model, prompts * seeds, config,
                                                 generator=generator)
    per_phrasing = {}
    for k, phrasing in enumerate(phrasings):
        rows = [j * len(prompts) + k * prompts_per_phrasing + i
                for j in range(seeds) for i in range(prompts_per_phrasing)]
        per_phrasing[phrasing.name] = {
            "accuracy": float(np.mean([verdicts[r]["all_correct"] for r in rows])),
            "per_attribute": {a: float(np.mean([verdicts[r][a] for r in rows]))
                              for a in ATTRIBUTES},
            "images": len(rows)}
    single = {n: r for n, r in per_phrasing.items() if n.startswith("1 object")}
    double = {n: r for n, r in per_phrasing.items() if not n.startswith("1 object")}
    worst = min(single, key=lambda n: single[n]["accuracy"])
    small = [v["shape"] for v, p in zip(verdicts, prompts * seeds)
             if any(o.size == "small" for o in shapes.parse_caption(p).objects)]
    results = {
        "prompt_set": prompt_set, "prompts_per_phrasing": prompts_per_phrasing, "seeds": seeds,
        "phrasings": per_phrasing,
        "single_object_accuracy": float(np.mean([r["accuracy"] for r in single.values()])),
        "single_object_worst_phrasing_accuracy": single[worst]["accuracy"],
        "single_object_worst_phrasing": worst,
        "two_object_accuracy": float(np.mean([r["accuracy"] for r in double.values()])),
        "small_shape_accuracy": float(np.mean(small)),
        "small_shape_images": len(small),
        "seconds_per_image_batched": drawn["seconds_per_image"]}
    shown = [k * prompts_per_phrasing + i for k in range(len(phrasings))
             for i in range(min(2, prompts_per_phrasing))]
    return results, images_lib.grid([images[i] for i in shown], rows=len(phrasings) // 3)


def evaluate(config: ml_collections.ConfigDict, model_dir: Optional[str] = None,
             clip_dir: Optional[str] = None, *, prompt_set: str = "report",
             prompts_per_phrasing: int = PROMPTS_PER_PHRASING, seeds: int = SEEDS,
             num_images: int = 256, out: Optional[str] = None,
             grid: Optional[str] = None) -> dict:
    """Every figure of the module docstring for the model at `model_dir` (default: the embedded
    one) drawn at `config`'s settings (configs/shapes.py); CLIP only when `clip_dir` is given.
    Written to `out` as JSON when given, with the grid of `evaluate_phrasings` at `grid`."""
    model_dir = model_dir or DEFAULT_MODEL
    model = load_pretrained(model_dir)
    results: dict = {"model": str(model_dir),
                     "settings": {"sampler": config.sampler, "steps": config.steps,
                                  "cfg_scale": config.cfg_scale,
                                  "size": f"{config.width}x{config.height}"},
                     "targets": TARGETS}
    timings = {}

    started = time.perf_counter()
    heldout_images, _, _ = example_batch(num_images, seed=1234, held_out=True)
    results.update(vae_psnr(model, heldout_images))
    timings["vae"] = time.perf_counter() - started

    if clip_dir:
        started = time.perf_counter()
        scorer = load_clip_scorer(clip_dir)
        images, _, scenes = example_batch(num_images, seed=4321, held_out=True, two_object_prob=0.0)
        results.update(clip_zero_shot(scorer.config, scorer.params, scorer.tokenizer, images,
                                      scenes))
        timings["clip"] = time.perf_counter() - started

    started = time.perf_counter()
    phrased, samples = evaluate_phrasings(model, config, prompt_set=prompt_set,
                                          prompts_per_phrasing=prompts_per_phrasing, seeds=seeds)
    results.update(phrased)
    timings["generation"] = time.perf_counter() - started
    results["evaluation_seconds"] = timings
    results["meets_targets"] = {k: results[k] >= v for k, v in TARGETS.items() if k in results}
    if grid:
        images_lib.save_png(samples, grid)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return results


def format_results(results: dict) -> str:
    """The figures of `evaluate`'s results as lines of text, each target marked met or not, then
    every phrasing's all-correct share and its weakest attributes."""
    lines = [f"prompts: {results.get('prompt_set', 'report')} set, "
             f"{results.get('prompts_per_phrasing')} per phrasing x {results.get('seeds')} seeds"]
    for key, target in TARGETS.items():
        if key in results:
            value = results[key]
            shown = f"{value:.2f} dB" if key.endswith("_db") else f"{100 * value:.1f}%"
            goal = f"{target:.0f} dB" if key.endswith("_db") else f"{100 * target:.0f}%"
            mark = "ok" if value >= target else "below target"
            lines.append(f"{key:38s} {shown:>9s}   (target >= {goal}: {mark})")
    if "single_object_accuracy" in results:
        lines.append(f"{'single_object_accuracy':38s} {100 * results['single_object_accuracy']:8.1f}%")
    if "clip_zero_shot_per_attribute" in results:
        lines.append(f"{'clip_zero_shot_per_attribute':38s} " + ", ".join(
            f"{a} {100 * v:.1f}%" for a, v in results["clip_zero_shot_per_attribute"].items()))
    for name, figures in results.get("phrasings", {}).items():
        weak = sorted((v, a) for a, v in figures["per_attribute"].items() if v < 1.0)[:2]
        note = ", ".join(f"{a} {100 * v:.0f}%" for v, a in weak)
        lines.append(f"  {name:58s} {100 * figures['accuracy']:5.1f}%  {note}")
    return "\n".join(lines)
