"""A LoRA for the embedded default model (sdjax/assets/default_model/loras/): it teaches the model
a heart, a shape its training never showed it (`shapes.EXTRA_SHAPES`). Trained with sdjax's own
loop on `shapes.lora_examples` (configs/default_model_lora.py; experiments/train_default_model_lora.py
runs `build_lora`), evaluated with the judge:

  concept accuracy    every held-out heart prompt (`shapes.extra_heldout_prompts`: 112 single-object
                      full captions the training data never holds) drawn once with the LoRA at
                      weight 1; the fraction right in every attribute (target >= 90%). Also at
                      weight 0: what the base model makes of the same prompts
  base accuracy       the default model's accuracy on the 280 base prompts of
                      `shapes.heldout_prompts` with the LoRA loaded at weight 0 (target: within 3
                      points of the model drawing them without it, at the same seeds) and at
                      weight 1 (how much the LoRA disturbs the rest; reported)
  two objects         heart scenes with two objects (a heart beside a base shape, or two hearts),
                      at weight 1 (reported)
  as prompts are      the held-out heart scenes as people phrase prompts (`shapes.written_prompt`), at
  written             weight 1 (reported)

One Generator draws everything with the LoRA applied at run time (`Request.adapters`): its weight
is data, so the whole sweep runs one compiled program (`programs_traced`).
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Optional

import ml_collections
import numpy as np

from sdjax import DEFAULT_MODEL
from sdjax import images as images_lib
from sdjax.data import shapes
from sdjax.evaluation import default_model
from sdjax.evaluation.default_model_build import build_shipped_adapter
from sdjax.sampling.generator import Generator
from sdjax.weights.pretrained import load_pretrained

TARGETS = {"concept_accuracy": 0.90, "base_heldout_drift_at_weight_0": 0.03}
# Seeds of the evaluation's drawings: the base prompts (with and without the LoRA) at one seed, the
# heart prompts at seeds used nowhere else.
BASE_SEED, CONCEPT_SEED, TWO_OBJECT_SEED, WRITTEN_SEED = 0, 30_000, 40_000, 50_000
NUM_TWO_OBJECT_PROMPTS = 56


def two_object_prompts(count: int, seed: int = TWO_OBJECT_SEED) -> list[str]:
    """`count` full captions of two-object scenes holding a heart (`shapes.with_extra_shape`),
    never with a held-out base pair, seed-determined."""
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        scene = shapes.random_scene(rng, two_object_prob=1.0)
        if not shapes.is_held_out(scene):
            prompts.append(shapes.caption(shapes.with_extra_shape(scene, rng)))
    return prompts


def evaluate_lora(config: ml_collections.ConfigDict, lora: str, model_dir: Optional[str] = None,
                  *, num_prompts: int = 0, out: Optional[str] = None,
                  grid: Optional[str] = None) -> dict:
    """Every figure of the module docstring for the LoRA file `lora` on the model at `model_dir`
    (default: the embedded one), drawn at `config`'s settings (configs/shapes.py). `num_prompts`
    (0: all) cuts each prompt set to that many. Written to `out` as JSON when given; `grid`: a PNG
    of 32 held-out heart prompts (spread over them), at weight 0 (top) and 1 (bottom)."""
    model_dir = model_dir or DEFAULT_MODEL
    model = load_pretrained(model_dir)
    generator = Generator(model)
    results: dict = {"model": os.path.relpath(model_dir), "lora": os.path.basename(lora),
                     "settings": {"sampler": config.sampler, "steps": config.steps,
                                  "cfg_scale": config.cfg_scale,
                                  "size": f"{config.width}x{config.height}"},
                     "targets": TARGETS}
    started = time.perf_counter()

    def draw(prompts, weight, seed):
        return default_model.generate_and_judge(model, prompts, config, seed=seed,
                                                generator=generator, adapters=((lora, weight),))

    concept_prompts = default_model.spread_subset(shapes.extra_heldout_prompts(), num_prompts)
    drawn = {}
    for weight in (1.0, 0.0):
        figures, drawn[weight], _ = draw(concept_prompts, weight, CONCEPT_SEED)
        name = "concept" if weight == 1.0 else "concept_at_weight_0"
        results[f"{name}_accuracy"] = figures["accuracy"]
        results[f"{name}_per_attribute"] = figures["per_attribute"]
    results["concept_prompts"] = len(concept_prompts)

    base_prompts = default_model.spread_subset(list(shapes.heldout_prompts()), num_prompts)
    for weight in (0.0, 1.0):
        figures, _, _ = draw(base_prompts, weight, BASE_SEED)
        results[f"base_heldout_accuracy_at_weight_{weight:g}"] = figures["accuracy"]
        results[f"base_heldout_per_attribute_at_weight_{weight:g}"] = figures["per_attribute"]
    results["base_heldout_prompts"] = len(base_prompts)
    # The model alone, through a Generator of its own (the LoRA's draws stay one program).
    figures, _, _ = default_model.generate_and_judge(model, base_prompts, config, seed=BASE_SEED)
    results["base_heldout_accuracy_without_lora"] = figures["accuracy"]
    results["base_heldout_drift_at_weight_0"] = abs(
        results["base_heldout_accuracy_at_weight_0"] - figures["accuracy"])

    two = two_object_prompts(num_prompts or NUM_TWO_OBJECT_PROMPTS)
    figures, _, _ = draw(two, 1.0, TWO_OBJECT_SEED)
    results["two_object_accuracy"] = figures["accuracy"]
    results["two_object_per_attribute"] = figures["per_attribute"]
    rng = np.random.default_rng(5)
    written = [shapes.written_prompt(shapes.parse_caption(p), rng, full_share=0.0)
               for p in concept_prompts]
    figures, _, _ = draw(written, 1.0, WRITTEN_SEED)
    results["written_accuracy"] = figures["accuracy"]
    results["written_per_attribute"] = figures["per_attribute"]

    results["evaluation_seconds"] = time.perf_counter() - started
    results["programs_traced"] = generator.traces
    results["meets_targets"] = {
        "concept_accuracy": results["concept_accuracy"] >= TARGETS["concept_accuracy"],
        "base_heldout_drift_at_weight_0": (results["base_heldout_drift_at_weight_0"]
                                           <= TARGETS["base_heldout_drift_at_weight_0"])}
    if grid:
        shown = default_model.spread_subset(range(len(concept_prompts)), 32)
        images_lib.save_png(images_lib.grid([drawn[w][i] for w in (0.0, 1.0) for i in shown],
                                            rows=4), grid)
    if out:
        pathlib.Path(out).write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def format_lora_results(results: dict) -> str:
    """The figures of `evaluate_lora` as lines of text, each target marked met or not."""
    def pct(key):
        return f"{100 * results[key]:5.1f}%"

    ok = {k: "ok" if v else "below target" for k, v in results["meets_targets"].items()}
    lines = [
        f"concept_accuracy (weight 1)        {pct('concept_accuracy')}   (target >= 90%: "
        f"{ok['concept_accuracy']})",
        f"concept_accuracy (weight 0)        {pct('concept_at_weight_0_accuracy')}",
        f"base heldout_accuracy (weight 0)   {pct('base_heldout_accuracy_at_weight_0')}   "
        f"(without it {pct('base_heldout_accuracy_without_lora').strip()}, target within 3 "
        f"points: "
        f"{ok['base_heldout_drift_at_weight_0']})",
        f"base heldout_accuracy (weight 1)   {pct('base_heldout_accuracy_at_weight_1')}",
        "concept per attribute (weight 1)   " + ", ".join(
            f"{a} {100 * v:.1f}%" for a, v in results["concept_per_attribute"].items()),
        f"two_object_accuracy (weight 1)     {pct('two_object_accuracy')}",
        f"written_accuracy (weight 1)        {pct('written_accuracy')}",
    ]
    return "\n".join(lines)


def build_lora(config: ml_collections.ConfigDict, generation: ml_collections.ConfigDict,
               workdir: str, out: str, *, num_eval_prompts: int = 0,
               progress: bool = False) -> dict:
    """Write the training images (`config.shapes_data`), train the LoRA (`config`, resuming in
    `workdir/train`), evaluate it at `generation`'s settings, and write the shipped folder `out`
    (beside it first, renamed into place when complete): the kohya file, `evaluation.json`,
    `build.json` (timings, machine load), `README.md`, `samples.png`, `logs/`. Returns the
    build record with the evaluation under "evaluation"."""
    name = config.lora.output_name + ".safetensors"
    return build_shipped_adapter(
        config, workdir, out, name,
        evaluate=lambda file, grid: evaluate_lora(generation, file, num_prompts=num_eval_prompts,
                                                  grid=grid),
        readme=lambda record, results: readme(record, results, name),
        size_key="lora_bytes", progress=progress)


def readme(record: dict, results: dict, name: str) -> str:
    """The shipped folder's README.md: what the LoRA teaches, how to draw with it and rebuild it,
    its figures and timings."""
    stem = name.removesuffix(".safetensors")
    stages = "\n".join(f"| {stage} | {info.get('steps', '')} | {info['seconds']:.0f} |"
                       for stage, info in record["stages"].items())
    load = ", ".join(f"{x:.1f}" for x in record["load_average_at_start"])
    return f"""# A LoRA for the embedded default model: hearts

`{name}` (kohya's format, {record['lora_bytes'] / 1024:.0f} KB) teaches sdjax's default model
(`sdjax/assets/default_model`) a shape it never saw in training: a heart
(`sdjax.data.shapes.EXTRA_SHAPES`, drawn by the shapes world's own code; the judge knows it).
Draw with it:

    python -m experiments.generate --prompt="a large red heart in the center, blue background" \\
        --lora=sdjax/assets/default_model/loras/{name} --out_dir=outputs

or name it in the prompt (`<lora:{stem}:1>`) with `--lora_dir=sdjax/assets/default_model/loras`.

Rebuilt from scratch (training images, LoRA training, export, evaluation, this folder) by

    python -m experiments.train_default_model_lora --workdir=/tmp/sdjax_heart_lora

(configs/default_model_lora.py; training images from `shapes.lora_examples`, half of them
hearts, half ordinary scenes that keep the rest of the model as it was). What each figure means:
sdjax/evaluation/default_model_lora.py.

## Evaluation

```
{format_lora_results(results)}
```
`samples.png`: 32 of the held-out heart prompts at weight 0 (top two rows: the base model cannot
draw a heart) and at weight 1 (bottom two rows).

## Build ({record['devices'][0]}, {record['cpu_count']} CPU cores, started {record['started']}, load average {load})

| stage | steps | seconds |
|---|---|---|
{stages}
| total | | {record['total_seconds']:.0f} |
"""
