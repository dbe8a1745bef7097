"""Rebuild the embedded default model (sdjax/assets/default_model) from scratch, with sdjax's own
training loop: shapes-world data -> CLIP (configs/shapes_clip.py) -> VAE (configs/shapes_vae.py)
-> latent diffusion (configs/shapes_ldm.py: U-Net trained, VAE frozen, the CLIP text tower
fine-tuned at its own lr, caption dropout) -> a short fine-tune on captions written as prompts are
(configs/shapes_ldm_captions.py) -> export + evaluation.

    python -m experiments.build_default_model --workdir=/tmp/sdjax_default_model

Every stage checkpoints into --workdir and resumes there, so the same command continues an
interrupted build. Stage lengths can be overridden (--clip_steps, --vae_steps, --ldm_steps,
--captions_steps).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Optional

import numpy as np

ROOT = pathlib.Path(__file__).absolute().parent.parent


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


def _run_stage(config, workdir: pathlib.Path, progress: bool):
    from sdjax.training import loop

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
    from sdjax.data.shapes_dataset import vocabulary_token_ids

    text = dict(clip_params["text_model"])
    embedding = np.array(text["token_embedding"]["embedding"], np.float32)
    keep = np.zeros(embedding.shape[0], bool)
    keep[vocabulary_token_ids(tokenizer)] = True
    embedding[~keep] = 0.0
    text["token_embedding"] = {"embedding": embedding}
    return {**clip_params, "text_model": text}


def clip_text_encoder(clip_config, clip_params: dict):
    """The CLIP's text tower as a diffusion text encoder: (CLIPTextConfig without projection,
    params), checked against the shapes that config implies."""
    from flax import traverse_util

    from sdjax.weights.clip import clip_text_shapes
    from sdjax.weights.common import DictSource, convert_state_dict

    text_config = dataclasses.replace(clip_config.text, projection_dim=None)
    params = {k: v for k, v in clip_params["text_model"].items() if k != "text_projection"}
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    params = convert_state_dict(DictSource(flat, name="shapes CLIP text tower"), lambda key: key,
                                clip_text_shapes(text_config), what="text_encoder",
                                reference_layout=False)
    return text_config, params


def assemble_ldm_init(vae_export: pathlib.Path, clip_config, clip_params: dict, tokenizer,
                      sample_images: np.ndarray, path: pathlib.Path):
    """The LDM stage's starting point: the VAE stage's export (random U-Net of the `shapes`
    preset, trained VAE) with the CLIP text tower as text encoder and the latent scaling factor
    set to 1 / std of the VAE's latents."""
    from experiments.evaluate_default_model import latent_std
    from sdjax.weights.pretrained import load_pretrained, save_pretrained

    model = load_pretrained(vae_export)
    std = latent_std(model, sample_images)
    text_config, text_params = clip_text_encoder(clip_config, clip_params)
    model = dataclasses.replace(
        model, vae_config=dataclasses.replace(model.vae_config, scaling_factor=float(1.0 / std)),
        text_configs=(text_config,), tokenizers=(tokenizer,),
        params={**model.params, "text_encoder": text_params}, source=str(path))
    save_pretrained(model, path)
    return float(1.0 / std)


def build(workdir: str, out: str, *, num_examples: int = 50_000,
          clip_steps: Optional[int] = None, vae_steps: Optional[int] = None,
          ldm_steps: Optional[int] = None, captions_steps: Optional[int] = None,
          num_eval_prompts: int = 0, num_eval_images: int = 256,
          progress: bool = True, overrides: Optional[dict] = None) -> dict:
    """Run every stage; returns the build record (also written to `out`/build.json).

    `overrides`: {"clip" | "vae" | "ldm" | "captions": {dotted config field: value}}, e.g. tiny sizes in tests."""
    import jax

    from configs import shapes_clip, shapes_ldm, shapes_ldm_captions, shapes_vae
    from experiments import evaluate_default_model as evaluation
    from sdjax.data.shapes_dataset import example_batch, write_shapes_folder
    from sdjax.evaluation.metrics import save_clip_native
    from sdjax.text.tokenizer import CLIPTokenizer
    from sdjax.training import loop

    overrides = overrides or {}
    workdir = pathlib.Path(workdir).absolute()
    out = pathlib.Path(out).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    record: dict = {"stages": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "devices": [str(d) for d in jax.devices()]}

    def configure(module, steps, stage):
        config = module.get_config(str(steps) if steps else None)
        config.data.folder = str(data)
        for field, value in overrides.get(stage, {}).items():
            target = config
            *parents, leaf = field.split(".")
            for p in parents:
                target = target[p]
            target[leaf] = value
        return config

    started = time.perf_counter()
    data = write_shapes_folder(workdir / "data", num_examples, seed=0)
    record["stages"]["data"] = {"seconds": time.perf_counter() - started,
                                "examples": num_examples}

    # 1. CLIP
    clip_cfg = configure(shapes_clip, clip_steps, "clip")
    result, stage = _run_stage(clip_cfg, workdir / "clip", progress)
    record["stages"]["clip"] = dataclasses.asdict(stage)
    clip_config = loop._clip_config(clip_cfg)
    clip_params = jax.device_get(loop.export_params(result["state"], use_ema=True)["clip"])
    del result
    tokenizer = CLIPTokenizer.default()
    clip_params = zero_unused_rows(clip_params, tokenizer)
    clip_dir = workdir / "clip_export"
    save_clip_native(clip_dir, clip_config, clip_params, tokenizer)
    # The loader gives the CLIP pixels in [-1, 1]: mean = std = 0.5 reproduces that.
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": clip_config.vision.image_size},
         "crop_size": {"height": clip_config.vision.image_size,
                       "width": clip_config.vision.image_size},
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, indent=2))

    # 2. VAE
    vae_cfg = configure(shapes_vae, vae_steps, "vae")
    result, stage = _run_stage(vae_cfg, workdir / "vae", progress)
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
    ldm_cfg = configure(shapes_ldm, ldm_steps, "ldm")
    ldm_cfg.init_from = str(workdir / "ldm_init")
    result, stage = _run_stage(ldm_cfg, workdir / "ldm", progress)
    record["stages"]["ldm"] = dataclasses.asdict(stage)
    ldm_export = pathlib.Path(result["export"])
    del result

    # 4. the same model on captions written as prompts are (attributes left out, other phrasings)
    started = time.perf_counter()
    captions_data = write_shapes_folder(workdir / "data_captions", num_examples // 2, seed=1,
                                        caption_variants=True)
    record["stages"]["captions_data"] = {"seconds": time.perf_counter() - started,
                                         "examples": num_examples // 2}
    captions_cfg = configure(shapes_ldm_captions, captions_steps, "captions")
    captions_cfg.data.folder = str(captions_data)
    captions_cfg.init_from = str(ldm_export)
    result, stage = _run_stage(captions_cfg, workdir / "captions", progress)
    record["stages"]["captions"] = dataclasses.asdict(stage)
    final_export = pathlib.Path(result["export"])
    del result

    # 4. the shipped folder: model, CLIP, training logs and configs, evaluation
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(final_export, staging)
    shutil.copytree(clip_dir, staging / "clip")
    (staging / "logs").mkdir()
    for name in ("clip", "vae", "ldm", "captions"):
        for log in ("metrics.jsonl", "config.json"):
            src = workdir / name / log
            if src.is_file():
                shutil.copy(src, staging / "logs" / f"{name}_{log}")
    started = time.perf_counter()
    results = evaluation.evaluate(str(staging), str(staging / "clip"),
                                  num_prompts=num_eval_prompts, num_images=num_eval_images,
                                  out=str(staging / "evaluation.json"),
                                  grid=str(staging / "heldout_samples.png"))
    record["stages"]["evaluate"] = {"seconds": time.perf_counter() - started}
    results["model"] = str(out)  # evaluated in its staging folder
    (staging / "evaluation.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    record["total_seconds"] = sum(s["seconds"] for s in record["stages"].values())
    (staging / "build.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    (staging / "README.md").write_text(_readme(record, results))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    record["evaluation"] = results
    return record


def _readme(record: dict, results: dict) -> str:
    from experiments.evaluate_default_model import format_results

    stages = "\n".join(
        f"| {name} | {stage.get('steps', '')} | {stage.get('train_seconds', stage['seconds']):.0f} |"
        for name, stage in record["stages"].items())
    return f"""# sdjax's embedded default model

A tiny latent-diffusion model of the shapes world (`sdjax/data/shapes.py`), 32x32 px, trained
from scratch with sdjax's own training loop by

    python -m experiments.build_default_model

(configs/shapes_clip.py, configs/shapes_vae.py, configs/shapes_ldm.py,
configs/shapes_ldm_captions.py; generation defaults in configs/shapes.py). `python -m experiments.generate --prompt "..."` uses it when no --model is
given; `python -m experiments.evaluate_default_model` re-measures the figures below.

Contents: `sdjax.json`, `params/`, `tokenizer/` (the native model folder), `clip/` (the shapes
CLIP, native CLIP folder), `logs/` (each stage's config and metrics), `evaluation.json`,
`build.json` (stage timings), `heldout_samples.png` (the first 64 held-out prompts).

## Evaluation

```
{format_results(results)}
```
`heldout_written_accuracy`: the held-out scenes as people phrase prompts (sizes, positions or the
background left out, "on a blue background"); prompts that leave the position out are the weak
spot. Full captions (`a large red circle in the center, blue background`) are what it knows best.

## Build ({record['devices'][0]}, started {record['started']})

| stage | steps | seconds |
|---|---|---|
{stages}
"""


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from experiments.evaluate_default_model import format_results

    record = build(FLAGS.workdir, FLAGS.out, num_examples=FLAGS.num_examples,
                   clip_steps=FLAGS.clip_steps, vae_steps=FLAGS.vae_steps,
                   ldm_steps=FLAGS.ldm_steps, captions_steps=FLAGS.captions_steps,
                   num_eval_prompts=FLAGS.num_eval_prompts,
                   progress=FLAGS.progress)
    for name, stage in record["stages"].items():
        trained = f"  (training {stage['train_seconds']:.0f} s)" if "train_seconds" in stage else ""
        print(f"{name:10s} {stage['seconds']:8.1f} s{trained}")
    print(format_results(record["evaluation"]))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", "/tmp/sdjax_default_model", "data, checkpoints, stage exports")
    flags.DEFINE_string("out", str(ROOT / "sdjax" / "assets" / "default_model"),
                        "where the finished model folder goes")
    flags.DEFINE_integer("num_examples", 50_000, "training images written to the data folder")
    flags.DEFINE_integer("clip_steps", None, "CLIP steps (default: configs/shapes_clip.py)")
    flags.DEFINE_integer("vae_steps", None, "VAE steps (default: configs/shapes_vae.py)")
    flags.DEFINE_integer("ldm_steps", None, "LDM steps (default: configs/shapes_ldm.py)")
    flags.DEFINE_integer("captions_steps", None,
                         "caption-variety fine-tune steps (default: configs/shapes_ldm_captions.py)")
    flags.DEFINE_integer("num_eval_prompts", 0, "held-out prompts to evaluate (0 = all 280)")
    flags.DEFINE_bool("progress", False, "progress bars")
    FLAGS = flags.FLAGS
    app.run(main)
