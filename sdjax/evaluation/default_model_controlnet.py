"""A ControlNet for the embedded default model (sdjax/assets/controlnets/shapes_mask/): it places the
object where a mask says, the mask drawn by the shapes world's own code
(`sdjax.data.shapes_control.control_image`). Trained with sdjax's own loop
(configs/default_model_controlnet.py; experiments/train_default_model_controlnet.py runs
`build_controlnet`), evaluated with the judge:

  position follows   single-object prompts that name no position ("a small red circle, blue
  the control        background"), each drawn with the object's mask at every one of the five
                     positions; the fraction of drawings whose judged position is the mask's
                     (target >= 95%), and the colour / shape / size / background / all-correct rates
                     of the same drawings, judged against the prompt plus the mask's position
  without control    the same prompts drawn without the ControlNet, judged against the prompt
                     (no position): the rates the control must keep (colour, shape, background)

The prompts come from scenes the ControlNet's training never holds (the composition split's
held-out (colour, shape) pairs are not drawn: the base model was never taught them either) at
seeds used nowhere else. One Generator draws everything: the control images and scales are
data, so the evaluation and the scale x CFG grid run without recompiling per image.
"""
from __future__ import annotations

import dataclasses
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
from sdjax.data.shapes_control import control_image
from sdjax.evaluation import default_model
from sdjax.evaluation.default_model_build import build_shipped_adapter
from sdjax.evaluation.judge import ATTRIBUTES
from sdjax.sampling.controls import Control
from sdjax.sampling.generator import Generator
from sdjax.weights.controlnet import load_controlnet, save_controlnet
from sdjax.weights.pretrained import load_pretrained

TARGETS = {"position_follows_control": 0.95}
EVAL_SEED, NUM_SCENES = 60_000, 40
# The grid of the docs: control scale x guidance scale for one prompt and mask.
GRID_PROMPT, GRID_POSITION = "a large blue circle, yellow background", "left"
GRID_CONTROL_SCALES = (0.0, 0.25, 0.5, 1.0, 1.5)
GRID_CFG_SCALES = (1.0, 2.0, 4.0, 7.0)


def eval_scenes(count: int = NUM_SCENES, seed: int = EVAL_SEED) -> list[shapes.Scene]:
    """`count` single-object scenes without a position (size, colour, shape, background drawn from
    `seed`), never a held-out composition, no two alike."""
    rng = np.random.default_rng(seed)
    scenes: list[shapes.Scene] = []
    while len(scenes) < count:
        scene = shapes.random_scene(rng, two_object_prob=0.0)
        obj = dataclasses.replace(scene.objects[0], position=None)
        unplaced = shapes.Scene((obj,), scene.background)
        if not shapes.is_held_out(scene) and unplaced not in scenes:
            scenes.append(unplaced)
    return scenes


def placed(scene: shapes.Scene, position: str) -> shapes.Scene:
    return shapes.Scene(tuple(dataclasses.replace(o, position=position) for o in scene.objects),
                        scene.background)


def mask_of(scene: shapes.Scene, image_size: int) -> np.ndarray:
    """The control image of a placed scene: its object white on black, float (S, S, 3) in [0, 1]."""
    offsets = [(0.0, 0.0)] * len(scene.objects)
    return control_image(scene, image_size, offsets, "mask").astype(np.float32) / 255.0


def evaluate_controlnet(config: ml_collections.ConfigDict, controlnet: str,
                        model_dir: Optional[str] = None, *, num_scenes: int = NUM_SCENES,
                        out: Optional[str] = None, samples: Optional[str] = None,
                        grid: Optional[str] = None) -> dict:
    """Every figure of the module docstring for the ControlNet at `controlnet` (a folder or file)
    on the model at `model_dir` (default: the embedded one), drawn at `config`'s settings
    (configs/shapes.py). Written to `out` as JSON when given; `samples`: a PNG of drawings with
    their masks; `grid`: the control scale x CFG grid."""
    model_dir = model_dir or DEFAULT_MODEL
    model = load_pretrained(model_dir)
    generator = Generator(model)
    size = int(config.height)
    scenes = eval_scenes(num_scenes)
    prompts, truths, masks = [], [], []
    for scene in scenes:
        for position in shapes.POSITIONS:
            prompts.append(shapes.caption(scene))
            truths.append(placed(scene, position))
            masks.append(mask_of(truths[-1], size))
    results: dict = {"model": os.path.relpath(model_dir), "controlnet": os.path.basename(controlnet),
                     "settings": {"sampler": config.sampler, "steps": config.steps,
                                  "cfg_scale": config.cfg_scale, "control_scale": 1.0,
                                  "size": f"{config.width}x{config.height}"},
                     "targets": TARGETS, "scenes": len(scenes), "drawings": len(prompts)}
    started = time.perf_counter()
    control = Control(controlnet, masks, scale=[1.0] * len(prompts))
    figures, drawn, _ = default_model.generate_and_judge(
        model, prompts, config, seed=EVAL_SEED, generator=generator, judged=truths,
        controls=[control])
    results["with_control_accuracy"] = figures["accuracy"]
    results["with_control_per_attribute"] = figures["per_attribute"]
    results["position_follows_control"] = figures["per_attribute"]["position"]
    without, _, _ = default_model.generate_and_judge(model, prompts, config, seed=EVAL_SEED,
                                                     generator=generator)
    results["without_control_accuracy"] = without["accuracy"]
    results["without_control_per_attribute"] = without["per_attribute"]
    results["evaluation_seconds"] = time.perf_counter() - started
    results["programs_traced"] = generator.traces
    results["meets_targets"] = {"position_follows_control": (
        results["position_follows_control"] >= TARGETS["position_follows_control"])}
    if samples:  # eight scenes: their masks over their drawings, one column per position
        shown = default_model.spread_subset(range(len(scenes)), 8)
        tiles = []
        for i in shown:
            row = range(i * len(shapes.POSITIONS), (i + 1) * len(shapes.POSITIONS))
            tiles += [images_lib.to_uint8(2 * masks[k] - 1) for k in row] + [drawn[k] for k in row]
        images_lib.save_png(images_lib.grid(tiles, rows=2 * len(shown)), samples)
    if grid:
        scale_cfg_grid(generator, config, controlnet, grid)
    if out:
        pathlib.Path(out).write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def scale_cfg_grid(generator: Generator, config: ml_collections.ConfigDict, controlnet: str,
                   path: str, *, seed: int = 7, zoom: int = 3) -> None:
    """An X/Y grid of `GRID_PROMPT` with the mask at `GRID_POSITION`: control scale across,
    guidance scale down, every cell from the same seed (one program for all: both are data)."""
    from sdjax.sampling.generate import spec_from_config
    from sdjax.sampling.requests import Request

    mask = mask_of(placed(shapes.parse_caption(GRID_PROMPT), GRID_POSITION), int(config.height))
    spec = dataclasses.replace(spec_from_config(config), progress=False, guidance=True)
    cells = []
    for cfg in GRID_CFG_SCALES:
        for scale in GRID_CONTROL_SCALES:
            out = generator(Request(prompt=GRID_PROMPT, seed=seed, cfg_scale=cfg,
                                    controls=[Control(controlnet, mask, scale=scale)]), spec)
            cells.append(np.kron(images_lib.to_uint8(out["images"])[0],
                                 np.ones((zoom, zoom, 1), np.uint8)))
    images_lib.save_png(images_lib.grid(
        cells, rows=len(GRID_CFG_SCALES),
        col_labels=[f"control {s:g}" for s in GRID_CONTROL_SCALES],
        row_labels=[f"CFG {c:g}" for c in GRID_CFG_SCALES]), path)


def format_controlnet_results(results: dict) -> str:
    """The figures of `evaluate_controlnet` as lines of text, the target marked met or not."""
    ok = "ok" if results["meets_targets"]["position_follows_control"] else "below target"
    attrs = lambda key: ", ".join(f"{a} {100 * results[key][a]:.1f}%" for a in ATTRIBUTES)
    return "\n".join([
        f"position follows the control   {100 * results['position_follows_control']:5.1f}%   "
        f"(target >= 95%: {ok}; {results['drawings']} drawings)",
        f"all correct, with control      {100 * results['with_control_accuracy']:5.1f}%",
        f"all correct, without control   {100 * results['without_control_accuracy']:5.1f}%   "
        f"(judged without a position)",
        "with control:    " + attrs("with_control_per_attribute"),
        "without control: " + attrs("without_control_per_attribute"),
    ])


SHIPPED_FOLDER = "controlnet"  # the diffusers ControlNetModel folder inside the shipped folder


def build_controlnet(config: ml_collections.ConfigDict, generation: ml_collections.ConfigDict,
                     workdir: str, out: str, *, num_scenes: int = NUM_SCENES,
                     progress: bool = False) -> dict:
    """Train the ControlNet (`config`, resuming in `workdir/train`; the run writes its own
    shapes-world data), evaluate it at `generation`'s settings, and write the shipped folder `out`
    (beside it first, renamed into place when complete): the ControlNet as diffusers' folder
    `controlnet/` (in float16), `evaluation.json`, `build.json`, `README.md`, `samples.png`, `grid.png`,
    `logs/`. Returns the build record with the evaluation under "evaluation"."""
    def evaluate(controlnet: str, samples: str) -> dict:
        # Shipped in float16 (half the bytes); what is evaluated is what ships.
        save_controlnet(load_controlnet(controlnet, dtype="float16"), controlnet, overwrite=True)
        folder = pathlib.Path(samples).parent
        write_example_masks(folder / "masks", int(generation.height))
        return evaluate_controlnet(generation, controlnet, num_scenes=num_scenes, samples=samples,
                                   grid=str(folder / "grid.png"))

    return build_shipped_adapter(config, workdir, out, SHIPPED_FOLDER, evaluate=evaluate,
                                 readme=readme, size_key="controlnet_bytes", progress=progress)


def write_example_masks(folder: pathlib.Path, image_size: int) -> None:
    """Masks to draw with (`masks/<position>.png`): the grid prompt's square at each position."""
    folder.mkdir(parents=True, exist_ok=True)
    scene = shapes.parse_caption(GRID_PROMPT)
    for position in shapes.POSITIONS:
        mask = mask_of(placed(scene, position), image_size)
        images_lib.save_png(images_lib.to_uint8(2 * mask - 1), str(folder / f"{position}.png"))


def readme(record: dict, results: dict) -> str:
    """The shipped folder's README.md: what the ControlNet does, how to draw with it and rebuild
    it, its figures and timings."""
    stages = "\n".join(f"| {stage} | {info.get('steps', '')} | {info['seconds']:.0f} |"
                       for stage, info in record["stages"].items())
    load = ", ".join(f"{x:.1f}" for x in record["load_average_at_start"])
    return f"""# A ControlNet for the embedded default model: object masks

`{SHIPPED_FOLDER}/` (diffusers' `ControlNetModel` folder, {record['controlnet_bytes'] / 2 ** 20:.1f} MiB)
steers sdjax's default model (`sdjax/assets/default_model`) with a mask: white where the object
goes, black elsewhere, as `sdjax.data.shapes_control.control_image` draws it. Draw with it:

    python -m experiments.generate --prompt="{GRID_PROMPT}" \\
        --controlnet=sdjax/assets/controlnets/shapes_mask/{SHIPPED_FOLDER} \\
        --control_image=sdjax/assets/controlnets/shapes_mask/masks/bottom.png --out_dir=outputs

Rebuilt from scratch (training data, ControlNet training, export, evaluation, this folder) by

    python -m experiments.train_default_model_controlnet --workdir=/tmp/sdjax_controlnet

(configs/default_model_controlnet.py). What each figure means: sdjax/evaluation/default_model_controlnet.py.

## Evaluation

```
{format_controlnet_results(results)}
```
`masks/`: the object of that prompt at each of the five positions. `samples.png`: eight prompts (rows in pairs: the masks, then the drawings, one column per
position). `grid.png`: control scale across, guidance scale down, one seed.

## Build ({record['devices'][0]}, {record['cpu_count']} CPU cores, started {record['started']}, load average {load})

| stage | steps | seconds |
|---|---|---|
{stages}
| total | | {record['total_seconds']:.0f} |
"""
