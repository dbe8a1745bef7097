"""The embedded default model's build (experiments/build_default_model.py): shapes-world data ->
CLIP -> VAE -> latent diffusion (U-Net trained, VAE frozen, the CLIP text tower as text encoder,
fine-tuned at its own lr, every caption rewritten in a random phrasing as it is read) -> the same
continued on captions that name positions more often -> the shipped folder, evaluated.

Every stage is an ordinary run of sdjax's training loop on its own config, checkpointing into its
own folder under the workdir and resuming there, so building again continues an interrupted build.
The recipe sits with the evaluation because it ends in one (the shipped folder carries its
figures) and because it writes shapes-world data, which the generic training code never sees.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from sdjax.data import shapes
from sdjax.data.shapes_dataset import example_batch, vocabulary_token_ids, write_shapes_folder
from sdjax.evaluation import default_model as evaluation
from sdjax.weights.clip import save_clip_native
from sdjax.models.clip import CLIPConfig
from sdjax.text.tokenizer import CLIPTokenizer
from sdjax.training import loop
from sdjax.weights.clip import text_encoder_from_clip
from sdjax.weights.pretrained import load_pretrained, save_pretrained

STAGES = ("clip", "vae", "ldm", "ldm_positions")


@dataclasses.dataclass(frozen=True)
class BuildConfigs:
    """What the build runs: one training config per stage (the build fills in their data folders
    and `init_from`) and the generation settings the finished model is evaluated at."""
    clip: ml_collections.ConfigDict        # configs/shapes_clip.py
    vae: ml_collections.ConfigDict         # configs/shapes_vae.py
    ldm: ml_collections.ConfigDict         # configs/shapes_ldm.py
    ldm_positions: ml_collections.ConfigDict  # configs/shapes_ldm_positions.py
    generation: ml_collections.ConfigDict  # configs/shapes.py


@dataclasses.dataclass
class StageResult:
    seconds: float        # this invocation (a resumed, finished stage takes only its restore)
    train_seconds: float  # the whole training: steps at the median logged rate
    steps: int
    metrics: dict
    examples_per_sec: float


def logged_train_seconds(metrics_file: pathlib.Path) -> float:
    """Training time of a stage from its metrics.jsonl: its steps at the median logged rate.
    Compiles are left out, and so are the windows a resumed run logs from its checkpoint, whose
    length the log does not record."""
    rates, steps = [], 0
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line)
            steps = max(steps, record["step"])
            if record.get("steps_per_sec"):
                rates.append(record["steps_per_sec"])
    return steps / float(np.median(rates)) if rates else 0.0


def run_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path,
              progress: bool) -> tuple[dict, StageResult]:
    """Train one stage to its end (resuming from `workdir`); a preempted stage stops the build."""
    started = time.perf_counter()
    result = loop.train(config, str(workdir), progress=progress)
    if result["stopped"] != "done":
        raise SystemExit(f"{workdir}: stopped ({result['stopped']}) at step {result['step']}; "
                         f"run the same command again to continue")
    stage = StageResult(seconds=time.perf_counter() - started,
                        train_seconds=logged_train_seconds(workdir / "metrics.jsonl"),
                        steps=result["step"], metrics=dict(result["metrics"]),
                        examples_per_sec=result["examples_per_sec"])
    return result, stage


def zero_unused_rows(clip_params: dict, tokenizer) -> dict:
    """The CLIP params with the token-embedding rows of tokens the shapes world never uses set to
    zero: training never moved them from their random init, and zeros cost nothing in the
    (compressed) checkpoint, where 49,408 random rows would be most of the model's size."""
    text = dict(clip_params["text_model"])
    embedding = np.array(text["token_embedding"]["embedding"], np.float32)
    keep = np.zeros(embedding.shape[0], bool)
    keep[vocabulary_token_ids(tokenizer)] = True
    embedding[~keep] = 0.0
    text["token_embedding"] = {"embedding": embedding}
    return {**clip_params, "text_model": text}


def save_clip_export(folder: pathlib.Path, clip_config: CLIPConfig, clip_params: dict,
                     tokenizer) -> None:
    """The trained CLIP as a native CLIP folder whose preprocessing gives it pixels in [-1, 1], as
    the training loader did (mean = std = 0.5)."""
    save_clip_native(folder, clip_config, clip_params, tokenizer)
    size = clip_config.vision.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, indent=2))


def assemble_ldm_init(vae_export: pathlib.Path, clip_config: CLIPConfig, clip_params: dict,
                      tokenizer, sample_images: np.ndarray, path: pathlib.Path) -> float:
    """The LDM stage's starting point: the VAE stage's export (random U-Net of the `shapes`
    preset, trained VAE) with the CLIP text tower as text encoder and the latent scaling factor
    set to 1 / std of the VAE's latents; returns that factor."""
    model = load_pretrained(vae_export)
    std = evaluation.latent_std(model, sample_images)
    text_config, text_params = text_encoder_from_clip(clip_config, clip_params)
    model = dataclasses.replace(
        model, vae_config=dataclasses.replace(model.vae_config, scaling_factor=float(1.0 / std)),
        text_configs=(text_config,), tokenizers=(tokenizer,),
        params={**model.params, "text_encoder": text_params}, source=str(path))
    save_pretrained(model, path)
    return float(1.0 / std)


def build(workdir: str, out: str, configs: BuildConfigs, *, num_examples: int = 50_000,
          prompts_per_phrasing: int = evaluation.PROMPTS_PER_PHRASING,
          eval_seeds: int = evaluation.SEEDS, num_eval_images: int = 256,
          progress: bool = True) -> dict:
    """Run every stage, then write the evaluated model folder to `out` (beside it first, renamed
    into place when complete). Returns the build record (also `out`/build.json) with the
    evaluation's results under "evaluation"."""
    workdir = pathlib.Path(workdir).absolute()
    out = pathlib.Path(out).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    record: dict = {"stages": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "devices": [str(d) for d in jax.devices()]}

    def configure(config: ml_collections.ConfigDict, folder: pathlib.Path,
                  init_from: Optional[pathlib.Path] = None) -> ml_collections.ConfigDict:
        config = copy.deepcopy(config)
        config.data.folder = str(folder)
        if init_from is not None:
            config.init_from = str(init_from)
        return config

    started = time.perf_counter()
    data = write_shapes_folder(workdir / "data", num_examples, seed=0)
    record["stages"]["data"] = {"seconds": time.perf_counter() - started,
                                "examples": num_examples}

    # 1. CLIP
    result, stage = run_stage(configure(configs.clip, data), workdir / "clip", progress)
    record["stages"]["clip"] = dataclasses.asdict(stage)
    clip_config = loop.clip_config(configs.clip)
    clip_params = jax.device_get(loop.export_params(result["state"], use_ema=True)["clip"])
    del result
    tokenizer = CLIPTokenizer.default()
    clip_params = zero_unused_rows(clip_params, tokenizer)
    clip_dir = workdir / "clip_export"
    save_clip_export(clip_dir, clip_config, clip_params, tokenizer)

    # 2. VAE
    result, stage = run_stage(configure(configs.vae, data), workdir / "vae", progress)
    record["stages"]["vae"] = dataclasses.asdict(stage)
    vae_export = pathlib.Path(result["export"])
    del result

    # 3. latent diffusion
    started = time.perf_counter()
    sample_images, _, _ = example_batch(512, seed=77)
    scaling = assemble_ldm_init(vae_export, clip_config, clip_params, tokenizer, sample_images,
                                workdir / "ldm_init")
    record["stages"]["assemble"] = {"seconds": time.perf_counter() - started,
                                    "vae_scaling_factor": scaling}
    # The diffusion model learns every scene, held-out pairs too (a model people use should draw
    # every (colour, shape)); the CLIP above never saw them, so its zero-shot figure still
    # measures composition.
    started = time.perf_counter()
    ldm_data = write_shapes_folder(workdir / "data_ldm", num_examples, seed=2,
                                   examples=shapes.world_examples)
    record["stages"]["ldm_data"] = {"seconds": time.perf_counter() - started,
                                    "examples": num_examples}
    result, stage = run_stage(configure(configs.ldm, ldm_data, workdir / "ldm_init"),
                              workdir / "ldm", progress)
    record["stages"]["ldm"] = dataclasses.asdict(stage)
    ldm_export = pathlib.Path(result["export"])
    del result
    result, stage = run_stage(configure(configs.ldm_positions, ldm_data, ldm_export),
                              workdir / "ldm_positions", progress)
    record["stages"]["ldm_positions"] = dataclasses.asdict(stage)
    final_export = pathlib.Path(result["export"])
    del result

    # 4. the shipped folder: model, CLIP, training logs and configs, evaluation
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(final_export, staging)
    shutil.copytree(clip_dir, staging / "clip")
    (staging / "logs").mkdir()
    for name in STAGES:
        for log in ("metrics.jsonl", "config.json"):
            src = workdir / name / log
            if src.is_file():
                shutil.copy(src, staging / "logs" / f"{name}_{log}")
    started = time.perf_counter()
    results = evaluation.evaluate(configs.generation, str(staging), str(staging / "clip"),
                                  prompts_per_phrasing=prompts_per_phrasing, seeds=eval_seeds,
                                  num_images=num_eval_images,
                                  out=str(staging / "evaluation.json"),
                                  grid=str(staging / "samples.png"))
    record["stages"]["evaluate"] = {"seconds": time.perf_counter() - started}
    results["model"] = str(out)  # evaluated in its staging folder
    (staging / "evaluation.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    record["total_seconds"] = sum(s["seconds"] for s in record["stages"].values())
    (staging / "build.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    (staging / "README.md").write_text(readme(record, results))
    if out.exists():
        # What other builds put in the folder (the shipped LoRA, embedding) is kept; it was
        # trained on the model this build replaces, so the build says so.
        for entry in sorted(out.iterdir()):
            if not (staging / entry.name).exists():
                shutil.move(str(entry), str(staging / entry.name))
                record.setdefault("kept_from_previous_model", []).append(entry.name)
        shutil.rmtree(out)
    staging.rename(out)
    record["evaluation"] = results
    return record


def format_build(record: dict) -> str:
    """Seconds per stage (with the training time of the trained ones), then the evaluation."""
    lines = []
    for name, stage in record["stages"].items():
        trained = f"  (training {stage['train_seconds']:.0f} s)" if "train_seconds" in stage else ""
        lines.append(f"{name:10s} {stage['seconds']:8.1f} s{trained}")
    for name in record.get("kept_from_previous_model", ()):
        lines.append(f"kept {name}/ from the folder's previous model: it was trained on that "
                     f"model, so rebuild it (see its README.md)")
    lines.append(evaluation.format_results(record["evaluation"]))
    return "\n".join(lines)


def readme(record: dict, results: dict) -> str:
    """The shipped folder's README.md: how it was built, what it holds, its figures."""
    stages = "\n".join(
        f"| {name} | {stage.get('steps', '')} | {stage.get('train_seconds', stage['seconds']):.0f} |"
        for name, stage in record["stages"].items())
    settings = results["settings"]
    return f"""# sdjax's embedded default model

A tiny latent-diffusion model of the shapes world (`sdjax/data/shapes.py`), 32x32 px, trained
from scratch with sdjax's own training loop by

    python -m experiments.build_default_model

(configs/shapes_clip.py, configs/shapes_vae.py, configs/shapes_ldm.py,
configs/shapes_ldm_positions.py; generation defaults in
configs/shapes.py). `python -m experiments.generate --prompt "..."` uses it when no --model is
given; `python -m experiments.evaluate_default_model` re-measures the figures below.

Contents: `sdjax.json`, `params/`, `tokenizer/` (the native model folder), `clip/` (the shapes
CLIP, native CLIP folder), `logs/` (each stage's config and metrics), `evaluation.json`,
`build.json` (stage timings), `samples.png` (two report prompts of every phrasing, first seed,
three phrasings a row in the order of the table below).

## Evaluation

Every phrasing of the grammar (one or two objects; size, position and background each named or
left out; "on a COLOUR background" or ", COLOUR background"), {results['prompts_per_phrasing']}
prompts each x {results['seeds']} seeds, judged attribute by attribute; the prompts are the
"report" set, disjoint from the "selection" prompts settings were chosen on
(`sdjax/evaluation/default_model.py`). Drawn with {settings['sampler']}, {settings['steps']}
steps, CFG {settings['cfg_scale']}, {settings['size']}.

```
{evaluation.format_results(results)}
```

## Build ({record['devices'][0]}, started {record['started']})

| stage | steps | seconds |
|---|---|---|
{stages}
"""


def build_shipped_adapter(config: ml_collections.ConfigDict, workdir: str, out: str,
                          file_name: str, *, evaluate: Callable[[str, str], dict],
                          readme: Callable[[dict, dict], str], size_key: str,
                          progress: bool = False) -> dict:
    """The build of an adapter shipped beside the default model (a LoRA, an embedding, a
    ControlNet): write the training images (`config.shapes_data`; a run without it writes its
    own), train (`config`, resuming in `workdir/train`), take the exported `file_name` (a file,
    or a folder), `evaluate(staged file, grid path)`, and write the folder `out`
    (beside it first, renamed into place when complete): the file, `evaluation.json`,
    `build.json` (timings, machine load, the file's size under `size_key`), `README.md`
    (`readme(record, results)`), `samples.png`, `logs/`. Returns the build record with the
    evaluation under "evaluation"."""
    began = time.perf_counter()
    workdir = pathlib.Path(workdir).absolute()
    out = pathlib.Path(out).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    record: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
                    "load_average_at_start": list(os.getloadavg()), "stages": {}}

    config = copy.deepcopy(config)
    if "shapes_data" in config:  # else the training run writes its own data (a ControlNet's)
        started = time.perf_counter()
        folder = write_shapes_folder(workdir / "data", config.shapes_data.num_examples,
                                     seed=config.shapes_data.seed,
                                     image_size=config.data.resolution,
                                     examples=loop.import_function(config.shapes_data.examples))
        config.data.folder = str(folder)
        record["stages"]["data"] = {"seconds": time.perf_counter() - started,
                                    "examples": config.shapes_data.num_examples}

    result, stage = run_stage(config, workdir / "train", progress)
    record["stages"]["train"] = dataclasses.asdict(stage)
    record["load_average_after_training"] = list(os.getloadavg())
    trained = pathlib.Path(result["export"]) / file_name
    del result

    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "logs").mkdir(parents=True)
    if trained.is_dir():  # a ControlNet's diffusers folder
        shutil.copytree(trained, staging / file_name)
    else:
        shutil.copy(trained, staging / file_name)
    for log in ("metrics.jsonl", "config.json"):
        shutil.copy(workdir / "train" / log, staging / "logs" / log)
    started = time.perf_counter()
    results = evaluate(str(staging / file_name), str(staging / "samples.png"))
    record["stages"]["evaluate"] = {"seconds": time.perf_counter() - started}
    record["total_seconds"] = time.perf_counter() - began
    record["load_average_at_end"] = list(os.getloadavg())
    shipped = staging / file_name
    files = [shipped] if shipped.is_file() else [f for f in shipped.rglob("*") if f.is_file()]
    record[size_key] = sum(f.stat().st_size for f in files)
    (staging / "evaluation.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (staging / "build.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    (staging / "README.md").write_text(readme(record, results))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    record["evaluation"] = results
    return record
