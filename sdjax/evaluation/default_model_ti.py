"""A textual-inversion token for the embedded default model (in
sdjax/assets/default_model/embeddings/): `xmark`, learned from 50 images to mean one object the model can draw but has no single word for,
a small red cross. Trained with sdjax's own loop (configs/default_model_ti.py; the model frozen,
three new vectors trained, each starting as the embedding of "cross") on `mark_examples` captioned
with the token in place of the object ("a xmark on the left, green background"); evaluated with
the judge, each drawing judged against its prompt with the token's meaning written back in
("a small red cross on the left, green background"):

  held-out accuracy    the single-object scenes (position, background) no training caption holds
                       (`HELD_OUT_SCENES`, 7 of the 35), each drawn at 8 seeds used nowhere else;
                       the fraction right in every attribute (target >= 90%)
  trained scenes       the other 28 scenes, 2 new seeds each (reported)
  two objects          the token beside another object, scenes drawn afresh (reported)
  spelled out          the held-out prompts with the meaning written instead of the token, at the
                       same seeds: what the base model reaches with words (the reference)
  untrained token      the held-out prompts with the token at its initial vectors ("cross" thrice)
  base prompts         the default model's own held-out prompts drawn with and without the token
                       loaded: bit-identical images (a new token changes no other prompt)

Every drawing with the token runs one compiled program: the untrained and trained vectors are
params of the same shapes, and prompts are data.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import time
from typing import Iterator, Optional

import ml_collections
import numpy as np

from sdjax import DEFAULT_MODEL
from sdjax import images as images_lib
from sdjax.adapters.embeddings import read_embedding, with_embeddings
from sdjax.data import shapes
from sdjax.evaluation import default_model
from sdjax.evaluation.default_model_build import build_shipped_adapter
from sdjax.sampling.generator import Generator
from sdjax.training import textual_inversion
from sdjax.weights.pretrained import load_pretrained

TOKEN = "xmark"
MARK = shapes.ShapeAttrs("cross", "red", "small")  # what the token means; position from the prompt
MEANING = f"{MARK.size} {MARK.colour} {MARK.shape}"
TARGETS = {"heldout_accuracy": 0.90}
BACKGROUNDS = tuple(c for c in shapes.COLOURS if c != MARK.colour)
# One (position, background) per background, the positions in turn: every position and background
# is still trained, only these seven combinations never are.
HELD_OUT_SCENES = tuple(zip(itertools.cycle(shapes.POSITIONS), BACKGROUNDS))
HELD_OUT_SEEDS_PER_SCENE, TRAINED_SEEDS_PER_SCENE = 8, 2
NUM_TWO_OBJECT_PROMPTS, NUM_BASE_PROMPTS = 56, 56
# Seeds of the evaluation's drawings, used by no other evaluation of the default model.
HELD_OUT_SEED, TRAINED_SEED, TWO_OBJECT_SEED, BASE_SEED = 60_000, 61_000, 62_000, 0


def with_token(text: str) -> str:
    """A shapes caption with the token in place of the object it means."""
    return text.replace(MEANING, TOKEN)


def spelled_out(prompt: str) -> str:
    """A prompt with the token's meaning written in its place: what the judge checks."""
    return prompt.replace(TOKEN, MEANING)


def _mark(position: str) -> shapes.ShapeAttrs:
    return dataclasses.replace(MARK, position=position)


def _two_object_scene(rng: np.random.Generator) -> shapes.Scene:
    """The mark and one other object (never the mark's colour, never a held-out base pair), as a
    left/right or top/bottom pair on a third colour."""
    pair = shapes.PAIRS[rng.integers(len(shapes.PAIRS))]
    slot = int(rng.integers(2))
    while True:
        other = shapes.ShapeAttrs(shapes.SHAPES[rng.integers(len(shapes.SHAPES))],
                                  BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                                  shapes.SIZES[rng.integers(len(shapes.SIZES))], pair[1 - slot])
        if not shapes.is_held_out(shapes.Scene((other,), None)):
            break
    objects = [None, None]
    objects[slot], objects[1 - slot] = _mark(pair[slot]), other
    background = str(rng.choice([c for c in BACKGROUNDS if c != other.colour]))
    return shapes.Scene(tuple(objects), background)


def mark_examples(seed: int, image_size: int = 32, *, two_object_prob: float = 0.2
                  ) -> Iterator[shapes.Example]:
    """An endless, seed-determined stream of scenes holding the mark, captioned with the token:
    alone at any position and background but the `HELD_OUT_SCENES`, or (`two_object_prob`) beside
    another object. An example's `scene` is the whole truth."""
    rng = np.random.default_rng(seed)
    held_out = set(HELD_OUT_SCENES)
    while True:
        if rng.random() < two_object_prob:
            scene = _two_object_scene(rng)
        else:
            position = shapes.POSITIONS[rng.integers(len(shapes.POSITIONS))]
            background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            if (position, background) in held_out:
                continue
            scene = shapes.Scene((_mark(position),), background)
        offsets = rng.uniform(-shapes.JITTER, shapes.JITTER, size=(len(scene.objects), 2))
        image = shapes.render(scene, image_size, offsets=[tuple(o) for o in offsets])
        yield shapes.Example(image, with_token(shapes.caption(scene)), scene)


def _single_prompt(position: str, background: str) -> str:
    return with_token(shapes.caption(shapes.Scene((_mark(position),), background)))


def heldout_prompts() -> list[str]:
    """Each held-out scene's prompt, `HELD_OUT_SEEDS_PER_SCENE` times (one drawing per seed)."""
    return [_single_prompt(p, b) for p, b in HELD_OUT_SCENES
            for _ in range(HELD_OUT_SEEDS_PER_SCENE)]


def trained_scene_prompts() -> list[str]:
    """Every single-object scene the training captions can hold, `TRAINED_SEEDS_PER_SCENE` times."""
    held_out = set(HELD_OUT_SCENES)
    return [_single_prompt(p, b) for p in shapes.POSITIONS for b in BACKGROUNDS
            if (p, b) not in held_out for _ in range(TRAINED_SEEDS_PER_SCENE)]


def two_object_prompts(count: int, seed: int = TWO_OBJECT_SEED) -> list[str]:
    rng = np.random.default_rng(seed)
    return [with_token(shapes.caption(_two_object_scene(rng))) for _ in range(count)]


def _draw(generator: Generator, prompts, config, seed: int, name: str, results: dict):
    """Draw `prompts` with `generator`, judged against their spelled-out captions; the figures go
    into `results` under `name`. Returns the images."""
    figures, images, _ = default_model.generate_and_judge(
        generator.model, prompts, config, seed=seed, generator=generator,
        judged=[spelled_out(p) for p in prompts])
    results[f"{name}_accuracy"] = figures["accuracy"]
    results[f"{name}_per_attribute"] = figures["per_attribute"]
    results[f"{name}_prompts"] = figures["prompts"]
    return images


def evaluate_embedding(config: ml_collections.ConfigDict, embedding: str, init_word: str,
                       model_dir: Optional[str] = None, *, out: Optional[str] = None,
                       grid: Optional[str] = None) -> dict:
    """Every figure of the module docstring for the embedding file `embedding` (its token: its
    file name), trained from `init_word`, on the model at `model_dir` (default: the embedded one),
    drawn at `config`'s settings (configs/shapes.py). Written to `out` as JSON when given; `grid`:
    a PNG of the held-out prompts spelled out (top), with the untrained token (middle) and the
    trained one (bottom), one drawing per held-out scene and seed."""
    model_dir = model_dir or DEFAULT_MODEL
    token = read_embedding(embedding).token
    if token != TOKEN:
        raise ValueError(f"{embedding}: the token is {token!r}; this evaluation judges {TOKEN!r}")
    base = load_pretrained(model_dir)
    model = with_embeddings(base, [embedding])
    results: dict = {"model": str(model_dir), "embedding": os.path.basename(embedding),
                     "token": TOKEN, "meaning": MEANING,
                     "settings": {"sampler": config.sampler, "steps": config.steps,
                                  "cfg_scale": config.cfg_scale,
                                  "size": f"{config.width}x{config.height}"},
                     "targets": TARGETS}
    started = time.perf_counter()
    generator = Generator(model)
    trained_params = generator.params
    heldout = heldout_prompts()
    drawn = {"trained": _draw(generator, heldout, config, HELD_OUT_SEED, "heldout", results)}
    _draw(generator, trained_scene_prompts(), config, TRAINED_SEED, "trained_scenes", results)
    _draw(generator, two_object_prompts(NUM_TWO_OBJECT_PROMPTS), config, TWO_OBJECT_SEED,
          "two_object", results)
    drawn["spelled_out"] = _draw(generator, [spelled_out(p) for p in heldout], config,
                                 HELD_OUT_SEED, "spelled_out", results)
    base_prompts = default_model.spread_subset(list(shapes.heldout_prompts()), NUM_BASE_PROMPTS)
    _, with_token_loaded, _ = default_model.generate_and_judge(
        model, base_prompts, config, seed=BASE_SEED, generator=generator)

    untrained = textual_inversion.make_inversion(base, textual_inversion.TextualInversionConfig(
        token=TOKEN, init_word=init_word, num_vectors=model.text_configs[0].vocab_size
        - base.text_configs[0].vocab_size))[1]
    generator.params = untrained.params  # the same shapes: the same program
    drawn["untrained"] = _draw(generator, heldout, config, HELD_OUT_SEED, "untrained_token",
                               results)
    generator.params = trained_params
    programs = generator.traces

    _, without, _ = default_model.generate_and_judge(base, base_prompts, config, seed=BASE_SEED)
    results["base_prompts"] = len(base_prompts)
    results["base_prompts_identical"] = bool(np.array_equal(with_token_loaded, without))
    results["programs_traced_with_token"] = programs
    results["evaluation_seconds"] = time.perf_counter() - started
    results["meets_targets"] = {"heldout_accuracy":
                                results["heldout_accuracy"] >= TARGETS["heldout_accuracy"]}
    if grid:
        images_lib.save_png(images_lib.grid(
            list(drawn["spelled_out"]) + list(drawn["untrained"]) + list(drawn["trained"]),
            rows=3 * len(HELD_OUT_SCENES)), grid)
    if out:
        pathlib.Path(out).write_text(json.dumps(results, indent=2, sort_keys=True))
    return results



def format_embedding_results(results: dict) -> str:
    """The figures of `evaluate_embedding` as lines of text, the target marked met or not."""
    def pct(key):
        return f"{100 * results[key]:5.1f}%"

    met = "ok" if results["meets_targets"]["heldout_accuracy"] else "below target"
    return "\n".join([
        f"heldout_accuracy          {pct('heldout_accuracy')}   (target >= 90%: {met}; "
        f"{results['heldout_prompts']} drawings of {len(HELD_OUT_SCENES)} scenes no training "
        f"caption holds)",
        "heldout per attribute     " + ", ".join(
            f"{a} {100 * v:.1f}%" for a, v in results["heldout_per_attribute"].items()),
        f"trained_scenes_accuracy   {pct('trained_scenes_accuracy')}",
        f"two_object_accuracy       {pct('two_object_accuracy')}",
        f"spelled_out_accuracy      {pct('spelled_out_accuracy')}   (the held-out prompts with "
        f"'{MEANING}' written: the base model's own)",
        f"untrained_token_accuracy  {pct('untrained_token_accuracy')}   (the token at its "
        f"initial vectors)",
        f"base prompts unchanged    {results['base_prompts_identical']}   "
        f"({results['base_prompts']} held-out base prompts, bit-identical with the token loaded)",
    ])


def build_embedding(config: ml_collections.ConfigDict, generation: ml_collections.ConfigDict,
                    workdir: str, out: str, *, progress: bool = False) -> dict:
    """Write the training images (`config.shapes_data`), learn the token (`config`, resuming in
    `workdir/train`), evaluate it at `generation`'s settings, and write the shipped folder `out`
    (beside it first, renamed into place when complete): the WebUI-format file, `evaluation.json`,
    `build.json` (timings, machine load), `README.md`, `samples.png`, `logs/`. Returns the build
    record with the evaluation under "evaluation"."""
    name = config.textual_inversion.token + ".safetensors"
    return build_shipped_adapter(
        config, workdir, out, name,
        evaluate=lambda file, grid: evaluate_embedding(
            generation, file, config.textual_inversion.init_word, grid=grid),
        readme=lambda record, results: readme(record, results, name, config),
        size_key="embedding_bytes", progress=progress)


def readme(record: dict, results: dict, name: str, config: ml_collections.ConfigDict) -> str:
    """The shipped folder's README.md: what the token means, how to draw with it and rebuild it,
    its figures and timings."""
    ti = config.textual_inversion
    train = record["stages"]["train"]
    stages = "\n".join(f"| {stage} | {info.get('steps', '')} | {info['seconds']:.0f} |"
                       for stage, info in record["stages"].items())
    load = ", ".join(f"{x:.1f}" for x in record["load_average_at_start"])
    load_end = ", ".join(f"{x:.1f}" for x in record["load_average_after_training"])
    return f"""# A textual-inversion token for the embedded default model: `{TOKEN}`

`{name}` ({record['embedding_bytes']} bytes: {ti.num_vectors} vectors, the WebUI's format) adds
the token `{TOKEN}` to sdjax's default model (`sdjax/assets/default_model`), learned to mean a
{MEANING}: an object the model draws but has no one word for. Nothing of the model changes;
prompts without the token draw exactly what they drew. Draw with it:

    python -m experiments.generate --embeddings_dir=sdjax/assets/default_model/embeddings \\
        --prompt="a {TOKEN} on the left, blue background" --out_dir=outputs

Learned from {config.shapes_data.num_examples} rendered images (`mark_examples`: the {MEANING}
at varied positions and backgrounds, a fifth of them beside another object, jittered), captioned
with the token in place of the object (`a {TOKEN} on the left, green background`); {ti.num_vectors}
vectors, each starting as the embedding of "{ti.init_word}"; {train['steps']} steps of batch
{config.data.batch_size}, the model frozen. Rebuilt from scratch (images, training, export,
evaluation, this folder) by

    python -m experiments.train_default_model_ti --workdir=/tmp/sdjax_xmark

(configs/default_model_ti.py). What each figure means: sdjax/evaluation/default_model_ti.py.

## Evaluation

Each drawing is judged against its prompt with `{TOKEN}` replaced by "{MEANING}".
```
{format_embedding_results(results)}
```
`samples.png`: one row per held-out scene, one column per seed; the prompts spelled out (top
seven rows), with the untrained token (middle seven), with the learned token (bottom seven).

## Build

{record['devices'][0]}, {record['cpu_count']} CPU cores shared with other work, started
{record['started']}; load average (1, 5, 15 min) {load} at the start, {load_end} after training.
Training: {train['train_seconds']:.0f} s of steps ({train['examples_per_sec']:.0f} examples/s), the
rest of its stage compiling and loading.

| stage | steps | seconds |
|---|---|---|
{stages}
| total | | {record['total_seconds']:.0f} |
"""
