"""Sampler × steps × guidance sweeps: images, labelled X/Y grids, a metrics table and plots.

A sweep is the product of samplers (with options: `flow_euler:shift=3.0`), step counts, guidance
variants (plain CFG, rescale φ, a limited guidance interval, SD3's skip-layer guidance, or
combinations), guidance scales and the optional axes: when `config.lora_weights` is set, the weight
of the LoRAs of `config.loras`; when `config.control_scales` is set, the conditioning scale of the
ControlNets of `config.controlnet`; when `config.embedded_guidances` is set, Flux.1-dev's distilled
guidance scale; drawn for every prompt with the same seeds. A *cell* is one (sampler, steps,
variant, scale[, LoRA weight][, ControlNet scale][, distilled guidance]) setting: one row of the
table.

Compilation: a program is compiled per static `SamplingSpec` — (sampler, steps, guidance
interval, skip-layer guidance's blocks and step window) here — and every scale, rescale φ,
skip-layer guidance scale, LoRA weight, ControlNet scale and distilled guidance of it runs through
that one program as data (LoRAs at run time, `Generator(adapter_mode="runtime")`; ControlNet
scales as `Control.scale`), one call per (cell, prompt) with the seeds as the batch. `run_sweep`
reports `Generator.traces`. As in diffusers and `experiments/generate.py`, skip-layer guidance
acts only with classifier-free guidance: a cell at scale 1 draws without it.

Out dir (written by `run_sweep`):
  config.json        the resolved config
  sweep.json         what the images depend on beyond the cell (model, size, ...); a restart with
                     other values refuses to mix them into the same tables
  records.jsonl      one line per (cell, prompt): files, timing, judge results, diversity, CLIP
                     scores; a restart skips the (cell, prompt) pairs already there
  images/<cell>/...  one PNG per image, with the WebUI `parameters` chunk
  metrics.csv/.md    one row per cell
  grids/*.png        X/Y plots (axes from config.grid), grids.json describes them
  plots/*.png        metric vs guidance scale and vs steps (when matplotlib imports)
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import math
import os
import re
import time
import types
from typing import Any, Optional, Sequence

import numpy as np
from absl import logging

from sdjax import images as images_lib
from sdjax import runs
from sdjax.data import shapes
from sdjax.diffusion.samplers import parse_sampler
from sdjax.evaluation import judge as judge_lib
from sdjax.evaluation import metrics
from sdjax.sampling.spec import SamplingSpec

AXES = ("sampler", "steps", "variant", "cfg_scale", "lora_weight", "control_scale",
        "embedded_guidance", "prompt", "seed")
CELL_FIELDS = ("sampler", "steps", "variant", "cfg_scale")
# Optional axes: a cell's field (and a record's, and a table's column) only in sweeps with that
# axis, which the config field (and `Sweep` field) named here lists the values of.
LORA_WEIGHT = "lora_weight"
CONTROL_SCALE = "control_scale"
EMBEDDED_GUIDANCE = "embedded_guidance"
OPTIONAL_AXES = {LORA_WEIGHT: "lora_weights", CONTROL_SCALE: "control_scales",
                 EMBEDDED_GUIDANCE: "embedded_guidances"}
JUDGE_COLUMNS = tuple(f"acc_{a}" for a in judge_lib.ATTRIBUTES) + ("all_correct",)
RECORDS = "records.jsonl"
SWEEP_MANIFEST = "sweep.json"
# What an image depends on besides its cell, prompt and seed: a restart must agree on these.
_FINGERPRINT_FIELDS = ("model", "vae", "components", "prediction_type", "dtype", "height",
                       "width", "negative_prompt", "clip_skip", "microbatch", "loras", "lora_mode",
                       "embeddings_dir", "max_sequence_length", "embedded_guidance", "slg_scale",
                       "slg_start", "slg_stop")


# --- the sweep -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """A guidance variant, comma-joined settings of:
    `cfg` plain classifier-free guidance;
    `rescale=φ` guidance rescale;
    `interval=START:END` guidance only while the progress 1 − t/T lies in [start, end];
    `slg=L1:L2:...[@START:STOP]` SD3 skip-layer guidance on those joint blocks, in the steps i
      with steps·START < i < steps·STOP (default: config.slg_start, config.slg_stop);
    `slg_scale=S` its scale (default config.slg_scale).
    `slg_window` and `slg_scale` None: the config's."""
    name: str
    rescale: float = 0.0
    interval: Optional[tuple[float, float]] = None
    slg_layers: tuple[int, ...] = ()
    slg_window: Optional[tuple[float, float]] = None
    slg_scale: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "Variant":
        text = text.strip()
        rescale, interval, layers, window, slg_scale = 0.0, None, (), None, None
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            try:
                if part == "cfg":
                    continue
                if key == "rescale":
                    rescale = float(value)
                elif key == "interval":
                    interval = _fraction_pair(value)
                elif key == "slg":
                    blocks, at, span = value.partition("@")
                    layers = tuple(int(k) for k in blocks.split(":"))
                    window = _fraction_pair(span) if at else None
                elif key == "slg_scale":
                    slg_scale = float(value)
                else:
                    raise ValueError(f"unknown setting {key!r}")
            except ValueError as err:
                raise ValueError(f"guidance variant {text!r}: {err}; use 'cfg', 'rescale=PHI', "
                                 f"'interval=START:END', 'slg=LAYER:LAYER...[@START:STOP]', "
                                 f"'slg_scale=S' or a comma-joined combination") from None
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance variant {text!r}: rescale must be in [0, 1]")
        for what, pair in (("interval", interval), ("slg window", window)):
            if pair is not None and not 0.0 <= pair[0] < pair[1] <= 1.0:
                raise ValueError(f"guidance variant {text!r}: {what} must satisfy "
                                 f"0 <= start < end <= 1")
        if min(layers, default=0) < 0 or len(set(layers)) != len(layers):
            raise ValueError(f"guidance variant {text!r}: slg layers must be distinct block "
                             f"indices >= 0")
        if slg_scale is not None and (not layers or not math.isfinite(slg_scale)):
            raise ValueError(f"guidance variant {text!r}: slg_scale must be finite and go with "
                             f"slg=LAYERS")
        return cls(name=text or "cfg", rescale=rescale,
                   interval=None if interval == (0.0, 1.0) else interval, slg_layers=layers,
                   slg_window=window, slg_scale=slg_scale)


def _fraction_pair(text: str) -> tuple[float, float]:
    """"START:END" -> (start, end)."""
    start, end = (float(v) for v in text.split(":"))
    return start, end


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting of the sweep: a row of the metrics table, a tile of a grid. The optional axes'
    fields (`OPTIONAL_AXES`, in that order) are None in sweeps without that axis."""
    sampler: str
    steps: int
    variant: str
    cfg_scale: float
    lora_weight: Optional[float] = None
    control_scale: Optional[float] = None
    embedded_guidance: Optional[float] = None

    @property
    def key(self) -> str:
        """A file-name-safe id, unique within a sweep."""
        optional = "".join(f"_{tag}{value:g}" for tag, value in (
            ("lora", self.lora_weight), ("control", self.control_scale),
            ("distilled", self.embedded_guidance)) if value is not None)
        return _slug(f"{self.sampler}_{self.steps}steps_{self.variant}_cfg{self.cfg_scale:g}"
                     f"{optional}")

    @classmethod
    def of_record(cls, record: dict) -> "Cell":
        return cls(record["sampler"], record["steps"], record["variant"], record["cfg_scale"],
                   *(record.get(axis) for axis in OPTIONAL_AXES))


def _slug(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).strip("-")[:limit] or "x"


def prompt_id(prompt: str) -> str:
    """A readable, file-name-safe id of a prompt (its start and a hash)."""
    return f"{_slug(prompt, 40)}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    samplers: tuple[str, ...]
    steps: tuple[int, ...]
    variants: tuple[Variant, ...]
    cfg_scales: tuple[float, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    height: int
    width: int
    negative_prompt: str = ""
    clip_skip: int = 0
    microbatch: int = 1
    loras: tuple = ()                      # NamedLora each, at their listed weights
    lora_weights: tuple = (None,)          # the LoRA weight axis; (None,) without one
    controls: tuple = ()                   # sampling.Control each, at their listed scales
    control_scales: tuple = (None,)        # the ControlNet scale axis; (None,) without one
    guess_mode: bool = False               # the ControlNets act on the conditional half only
    embedded_guidance: float = 3.5         # Flux.1-dev's distilled guidance, without its axis
    embedded_guidances: tuple = (None,)    # its axis; (None,) without one
    max_sequence_length: int = SamplingSpec.max_sequence_length   # T5 tokens (SD3 / Flux)
    # Skip-layer guidance of the variants that name no scale or window of their own.
    slg_scale: float = 2.8
    slg_window: tuple[float, float] = (SamplingSpec.slg_start, SamplingSpec.slg_stop)

    @classmethod
    def from_config(cls, config) -> "Sweep":
        def distinct(values, what):
            values = tuple(values)
            if not values:
                raise ValueError(f"config.{what} is empty")
            if len(set(values)) != len(values):
                raise ValueError(f"config.{what} repeats a value: {values}")
            return values

        def numbers(values, what):
            try:
                floats = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise ValueError(f"config.{what} must hold numbers, got {values!r}") from None
            if not all(math.isfinite(v) for v in floats):
                raise ValueError(f"config.{what} must be finite, got {floats}")
            return distinct(floats, what)

        samplers = distinct((s.strip() for s in config.samplers), "samplers")
        steps = distinct((int(s) for s in config.steps), "steps")
        if min(steps) < 1:
            raise ValueError(f"config.steps must be >= 1, got {steps}")
        parsed = [parse_sampler(s) for s in samplers]
        for i, sampler in enumerate(samplers):  # e.g. "flow_euler:shift=3" and "...:shift=3.0"
            if parsed[i] in parsed[:i]:
                raise ValueError(f"config.samplers: {sampler!r} is "
                                 f"{samplers[parsed.index(parsed[i])]!r} written another way")
        variants = tuple(Variant.parse(v) for v in distinct(config.variants, "variants"))
        scales = numbers(config.cfg_scales, "cfg_scales")
        skip_layer = [v.name for v in variants if v.slg_layers]
        if skip_layer and all(g == 1.0 for g in scales):
            raise ValueError(f"guidance variants {skip_layer} need a config.cfg_scales value other "
                             f"than 1: skip-layer guidance acts with classifier-free guidance only")
        if int(config.num_seeds) < 1:
            raise ValueError(f"config.num_seeds must be >= 1, got {config.num_seeds}")
        from sdjax.sampling.generate import check_control_settings, config_controls, config_loras

        loras = config_loras(config)
        lora_weights: tuple = (None,)
        if config.lora_weights:
            if not loras:
                raise ValueError("config.lora_weights sweeps the weights of config.loras, which "
                                 "is empty (give --lora=NAME)")
            lora_weights = numbers(config.lora_weights, "lora_weights")
        check_control_settings(config)
        controls = config_controls(config)
        control_scales: tuple = (None,)
        if config.control_scales:
            if not controls:
                raise ValueError("config.control_scales sweeps the scales of config.controlnet, "
                                 "which is empty (give --controlnet=PATH --control_image=IMAGE)")
            control_scales = numbers(config.control_scales, "control_scales")
        embedded_guidances: tuple = (None,)
        if config.embedded_guidances:
            embedded_guidances = numbers(config.embedded_guidances, "embedded_guidances")
        (embedded_guidance,) = numbers((config.embedded_guidance,), "embedded_guidance")
        (slg_scale,) = numbers((config.slg_scale,), "slg_scale")
        return cls(samplers=samplers, steps=steps, variants=variants, cfg_scales=scales,
                   prompts=distinct(select_prompts(config), "prompts"),
                   seeds=tuple(int(config.seed) + i for i in range(int(config.num_seeds))),
                   height=int(config.height), width=int(config.width),
                   negative_prompt=config.negative_prompt, clip_skip=int(config.clip_skip),
                   microbatch=int(config.microbatch), loras=loras, lora_weights=lora_weights,
                   controls=controls, control_scales=control_scales,
                   guess_mode=bool(config.control_guess_mode),
                   embedded_guidance=embedded_guidance, embedded_guidances=embedded_guidances,
                   max_sequence_length=int(config.max_sequence_length), slg_scale=slg_scale,
                   slg_window=(float(config.slg_start), float(config.slg_stop)))

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def optional_axes(self) -> tuple[str, ...]:
        """The `OPTIONAL_AXES` this sweep has."""
        return tuple(axis for axis, field in OPTIONAL_AXES.items()
                     if getattr(self, field) != (None,))

    def cells(self) -> list[Cell]:
        return [Cell(s, n, v.name, g, *optional) for s, n, v, g, *optional in
                itertools.product(self.samplers, self.steps, self.variants, self.cfg_scales,
                                  *(getattr(self, field) for field in OPTIONAL_AXES.values()))]

    def adapters(self, cell: Cell) -> tuple:
        """`Request.adapters` of a cell: `loras`, their weights times the cell's LoRA weight."""
        if cell.lora_weight is None:
            return self.loras
        return tuple(dataclasses.replace(lora, unet=lora.unet * cell.lora_weight,
                                         text_encoder=lora.text_encoder * cell.lora_weight)
                     for lora in self.loras)

    def controls_for(self, cell: Cell) -> tuple:
        """`Request.controls` of a cell: `controls`, their scales times the cell's ControlNet
        scale (data: every scale runs in the same program)."""
        if cell.control_scale is None:
            return self.controls
        return tuple(dataclasses.replace(control, scale=control.scale * cell.control_scale)
                     for control in self.controls)

    def cell_fields(self) -> tuple[str, ...]:
        """The fields that tell cells apart: the table's first columns."""
        return CELL_FIELDS + self.optional_axes

    def spec(self, cell: Cell) -> SamplingSpec:
        """The compiled program's static settings: the scales, rescale φ and distilled guidance
        are data; skip-layer guidance's blocks and window are not, its scale is."""
        name, options = parse_sampler(cell.sampler)
        variant = self.variant(cell.variant)
        # Variants without skip-layer guidance keep the spec's default window: one program.
        slg_start, slg_stop = ((variant.slg_window or self.slg_window) if variant.slg_layers
                               else (SamplingSpec.slg_start, SamplingSpec.slg_stop))
        return SamplingSpec(sampler=name, steps=cell.steps, height=self.height, width=self.width,
                            sampler_options=options,
                            # One program per sweep setting: scale 1 cells run it with scale 1.
                            guidance=any(g != 1.0 for g in self.cfg_scales),
                            guidance_interval=variant.interval,
                            clip_skip=self.clip_skip, microbatch=self.microbatch,
                            guess_mode=self.guess_mode,
                            max_sequence_length=self.max_sequence_length,
                            slg_layers=variant.slg_layers, slg_start=slg_start, slg_stop=slg_stop)

    def request(self, cell: Cell, prompt: str):
        """The `Request` of a (cell, prompt): the sweep's seeds as the batch."""
        from sdjax.sampling.requests import Request

        variant = self.variant(cell.variant)
        slg_scale = self.slg_scale if variant.slg_scale is None else variant.slg_scale
        return Request(prompt=prompt, negative_prompt=self.negative_prompt or None,
                       seed=self.seeds[0], num_images=len(self.seeds), cfg_scale=cell.cfg_scale,
                       guidance_rescale=variant.rescale, adapters=self.adapters(cell),
                       controls=self.controls_for(cell),
                       embedded_guidance=(self.embedded_guidance if cell.embedded_guidance is None
                                          else cell.embedded_guidance),
                       # Skip-layer guidance acts with classifier-free guidance only (diffusers'
                       # rule, and generate.py's, where scale 1 runs no guidance at all).
                       slg_scale=slg_scale if cell.cfg_scale != 1.0 else 0.0)

    def check_model(self, arch) -> None:
        """Refuse, before anything is drawn, a sweep that `arch` (an Architecture) cannot run:
        every program's settings, and the distilled-guidance axis on a model without one."""
        if self.embedded_guidances != (None,) and not (
                arch.family == "flux" and arch.transformer.guidance_embeds):
            raise ValueError(f"config.embedded_guidances sweeps Flux.1-dev's distilled guidance; "
                             f"this {arch.family} model has no guidance embedding")
        for spec, cells in self.programs().items():
            try:
                spec.validate(arch)
            except ValueError as err:
                raise ValueError(f"sampler {cells[0].sampler!r}, variant {cells[0].variant!r}: "
                                 f"{err}") from None

    def programs(self) -> dict:
        """SamplingSpec -> the cells it runs, in sweep order."""
        out: dict = {}
        for cell in self.cells():
            out.setdefault(self.spec(cell), []).append(cell)
        return out


def select_prompts(config) -> list[str]:
    """config.prompts, else config.prompt_file (one per line, # comments), else the shapes world's
    held-out prompts; then `num_prompts` of them evenly spaced (0: all)."""
    if config.prompts:
        prompts = [str(p) for p in config.prompts]
    elif config.prompt_file:
        path = os.path.expanduser(config.prompt_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not prompts:
            raise ValueError(f"{path}: no prompts (every line is blank or a # comment)")
    else:
        prompts = list(shapes.heldout_prompts())
    n = int(config.num_prompts)
    if 0 < n < len(prompts):
        # Evenly spaced, so a subset of the held-out list still covers its shapes and colours.
        prompts = [prompts[int(i * len(prompts) / n)] for i in range(n)]
    return prompts


def is_shapes_prompt(prompt: str) -> bool:
    try:
        shapes.parse_caption(prompt)
    except ValueError:
        return False
    return True


# --- records ---------------------------------------------------------------------------------------

def read_records(out_dir: str) -> list[dict]:
    """The finished (cell, prompt) records; a torn last line (a crash mid-write) is skipped."""
    return runs.read_jsonl(os.path.join(out_dir, RECORDS))


def _record_key(cell: Cell, prompt: str) -> tuple:
    # Optional axes are named in the key: a LoRA weight is never taken for a ControlNet scale.
    optional = tuple((axis, getattr(cell, axis)) for axis in OPTIONAL_AXES
                     if getattr(cell, axis) is not None)
    return (cell.sampler, cell.steps, cell.variant, cell.cfg_scale, prompt) + optional


def _key_of_record(record: dict) -> tuple:
    return _record_key(Cell.of_record(record), record["prompt"])


def _check_fingerprint(config, out_dir: str) -> None:
    from sdjax.sampling.generate import CONTROL_SHORTCUTS  # the ControlNet settings' fields

    fingerprint = {k: config[k] for k in sorted(_FINGERPRINT_FIELDS + CONTROL_SHORTCUTS)}
    path = os.path.join(out_dir, SWEEP_MANIFEST)
    if config.resume:
        runs.check_fingerprint(path, fingerprint, "the out dir holds a sweep",
                               remedy="use another out_dir, or config.resume=False to start it over")
        return
    if os.path.exists(os.path.join(out_dir, RECORDS)):
        os.remove(os.path.join(out_dir, RECORDS))
    runs.write_json_atomically(path, fingerprint)


# --- per (cell, prompt) metrics --------------------------------------------------------------------

def evaluate_group(images: np.ndarray, prompt: str, clip: Optional[metrics.ClipScorer]) -> dict:
    """Judge results (shapes prompts only), diversity across the seeds, CLIP scores."""
    out: dict = {"judge": None, "diversity": None, "clip_model": None, "clip_scores": None}
    if is_shapes_prompt(prompt):
        out["judge"] = [judge_lib.judge(image, prompt) for image in images]
    if len(images) >= 2:
        out["diversity"] = metrics.diversity(images)
    if clip is not None:
        out["clip_model"] = clip.source
        out["clip_scores"] = [float(s) for s in clip(images, prompt)]
    return out


def _load_images(out_dir: str, record: dict) -> np.ndarray:
    from PIL import Image

    arrays = []
    for name in record["files"]:
        with Image.open(os.path.join(out_dir, name)) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return np.stack(arrays)


# --- the run ---------------------------------------------------------------------------------------

def run_sweep(config, model=None, clip: Optional[metrics.ClipScorer] = None,
              generator=None) -> dict:
    """Run (or resume) the sweep of `config` (configs/ablate.py) and write its outputs.

    `model`: a loaded `Pretrained` (else `config.model` is loaded); `generator`: a `Generator` to
    draw with instead (its compiled programs are reused across sweeps; config.dtype, parallel and
    fsdp are then its own); `clip`: a `ClipScorer` (else `config.clip_model` is loaded if set).
    Returns {"rows", "columns", "csv", "markdown", "grids", "plots", "traces", "programs",
    "generated", "skipped"}: `traces` counts the compilations this run caused, `programs` the
    static settings that had work to do.
    """
    from sdjax.sampling.generate import load_model, make_generator
    from sdjax.sampling.exported import enable_compilation_cache

    sweep = Sweep.from_config(config)
    check_grid_axes(sweep, config.grid.x, config.grid.y)
    out_dir = os.path.expanduser(config.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _check_fingerprint(config, out_dir)
    runs.write_atomically(os.path.join(out_dir, "config.json"), config.to_json(indent=2))
    if config.compilation_cache:
        enable_compilation_cache(os.path.expanduser(config.compilation_cache))
    if clip is None and config.clip_model:
        clip = metrics.load_clip_scorer(os.path.expanduser(config.clip_model))

    records_path = os.path.join(out_dir, RECORDS)
    runs.repair_jsonl(records_path)  # drop a torn last line before appending after it
    previous = read_records(out_dir)
    records = {_key_of_record(r): r for r in previous if tuple(r["seeds"]) == sweep.seeds}
    programs = sweep.programs()
    todo = {spec: [(c, p) for c in cells for p in sweep.prompts
                   if _record_key(c, p) not in records]
            for spec, cells in programs.items()}
    todo = {spec: jobs for spec, jobs in todo.items() if jobs}
    skipped = len(sweep.cells()) * len(sweep.prompts) - sum(len(j) for j in todo.values())
    logging.info("ablation: %d cells x %d prompts x %d seeds in %d programs; %d (cell, prompt) "
                 "pairs already done", len(sweep.cells()), len(sweep.prompts), len(sweep.seeds),
                 len(programs), skipped)

    traces = 0
    if todo:
        if generator is None:
            generator = make_generator(config, model or load_model(config))
        sweep.check_model(generator.arch)
        traces_before = generator.traces
        model_name = os.path.basename(os.path.normpath(generator.model.source)) or "model"
        for spec, jobs in todo.items():
            for index, (cell, prompt) in enumerate(jobs):
                request = sweep.request(cell, prompt)
                if index == 0 and config.warmup:
                    # Compile outside the timed call, so seconds per image are the sampler's.
                    started = time.perf_counter()
                    generator(request, spec, check_finite=False)
                    logging.info("compiled %s, %d steps, interval %s in %.1f s", spec.sampler,
                                 spec.steps, spec.guidance_interval, time.perf_counter() - started)
                started = time.perf_counter()
                out = generator(request, spec, check_finite=False)
                seconds = time.perf_counter() - started
                # Non-finite images (flagged in `finite`) are stored black, not as cast garbage.
                images = images_lib.to_uint8(np.nan_to_num(out["images"], nan=-1.0))
                record = {f: getattr(cell, f) for f in sweep.cell_fields()}
                record.update({"prompt": prompt, "seeds": list(sweep.seeds), "seconds": seconds,
                               "finite": [bool(f) for f in out["finite"]],
                               "files": _save_images(out_dir, cell, prompt, images, sweep, spec,
                                                     request, generator, model_name)})
                record.update(evaluate_group(images, prompt, clip))
                runs.append_jsonl(records_path, record)
                records[_record_key(cell, prompt)] = record
                logging.info("%s | %s: %.2f s for %d images", cell.key, prompt, seconds,
                             len(images))
        traces = generator.traces - traces_before
        if traces > len(todo):
            logging.warning("ablation compiled %d times for %d programs: something recompiled",
                            traces, len(todo))

    ordered = [records[_record_key(c, p)] for c in sweep.cells() for p in sweep.prompts]
    if clip is not None and any(r.get("clip_model") != clip.source for r in ordered):
        # Resumed records scored with another (or no) CLIP model: score them from their PNGs.
        for record in ordered:
            if record.get("clip_model") != clip.source:
                record["clip_model"] = clip.source
                record["clip_scores"] = [float(s) for s in
                                         clip(_load_images(out_dir, record), record["prompt"])]
        others = [r for r in previous if tuple(r["seeds"]) != sweep.seeds]
        runs.write_jsonl_atomically(records_path, others + list(records.values()))

    columns, rows = aggregate(sweep, ordered, with_clip=clip is not None)
    csv_path = os.path.join(out_dir, "metrics.csv")
    write_csv(csv_path, columns, rows)
    grids = write_grids(out_dir, sweep, ordered, config.grid.x, config.grid.y,
                        int(config.grid.max_prompts))
    plots = write_plots(os.path.join(out_dir, "plots"), sweep, rows, columns)
    md_path = os.path.join(out_dir, "metrics.md")
    write_markdown(md_path, config, sweep, columns, rows, grids, plots, out_dir)
    return {"rows": rows, "columns": columns, "csv": csv_path, "markdown": md_path,
            "grids": grids, "plots": plots, "traces": traces, "programs": len(todo),
            "generated": sum(len(j) for j in todo.values()), "skipped": skipped}


def _save_images(out_dir: str, cell: Cell, prompt: str, images: np.ndarray, sweep: Sweep,
                 spec, request, generator, model_name: str) -> list[str]:
    """The PNGs of a (cell, prompt), with the `parameters` that `experiments/generate.py` writes
    for the same settings (its `generation_parameters`)."""
    from sdjax.sampling.generate import generation_parameters

    folder = os.path.join("images", cell.key)
    os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    adapters = generator.adapters_for(request)
    names = []
    for image, seed in zip(images, sweep.seeds):
        # What generation_parameters reads of a generation config.
        settings = types.SimpleNamespace(
            cfg_scale=cell.cfg_scale, guidance_rescale=request.guidance_rescale, seed=seed,
            subseed=-1, subseed_strength=0.0, embedded_guidance=request.embedded_guidance,
            slg_scale=request.slg_scale)
        name = os.path.join(folder, f"{prompt_id(prompt)}-{seed}.png")
        text = images_lib.format_parameters(prompt, sweep.negative_prompt, generation_parameters(
            settings, spec, seed, model_name, adapters, generator.adapter_mode, request.controls,
            generator.arch))
        images_lib.save_png(image, os.path.join(out_dir, name), text)
        names.append(name)
    return names


def _clear(folder: str, prefix: str) -> None:
    """Remove a previous run's PNGs, so the folder holds only what this run's tables describe."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".png"):
            os.remove(os.path.join(folder, name))


# --- tables ----------------------------------------------------------------------------------------

def aggregate(sweep: Sweep, records: Sequence[dict],
              with_clip: bool) -> tuple[list[str], list[dict]]:
    """One row per cell (sweep order): images, non-finite count, judge accuracies (when some
    prompt is a shapes prompt), diversity (when >= 2 seeds), CLIP score, seconds per image."""
    judged = any(is_shapes_prompt(p) for p in sweep.prompts)
    columns = list(sweep.cell_fields()) + ["images", "nonfinite"]
    if judged:
        columns += ["judged", *JUDGE_COLUMNS]
    if len(sweep.seeds) >= 2:
        columns.append("diversity")
    if with_clip:
        columns.append("clip_score")
    columns.append("sec_per_image")
    by_cell: dict = {}
    for record in records:
        by_cell.setdefault(Cell.of_record(record), []).append(record)
    rows = []
    for cell in sweep.cells():
        group = by_cell[cell]
        row = {f: getattr(cell, f) for f in sweep.cell_fields()}
        row["images"] = sum(len(r["files"]) for r in group)
        row["nonfinite"] = sum(not f for r in group for f in r["finite"])
        if judged:
            results = [j for r in group if r["judge"] for j in r["judge"]]
            row["judged"] = len(results)
            for attribute, column in zip(judge_lib.ATTRIBUTES + ("all_correct",), JUDGE_COLUMNS):
                row[column] = (float(np.mean([j[attribute] for j in results])) if results
                               else math.nan)
        if "diversity" in columns:
            row["diversity"] = float(np.mean([r["diversity"] for r in group]))
        if with_clip:
            row["clip_score"] = float(np.mean([s for r in group for s in r["clip_scores"]]))
        row["sec_per_image"] = float(np.mean([r["seconds"] / len(r["files"]) for r in group]))
        rows.append(row)
    return columns, rows


def steps_to_fraction(rows: Sequence[dict], metric: str = "all_correct",
                      fraction: float = 0.95) -> list[dict]:
    """Per (sampler, variant, cfg_scale[, optional axes]) swept over >= 2 step counts: `metric` at
    the most steps, and the fewest steps whose `metric` reaches `fraction` of it (how many steps a
    sampler needs)."""
    groups: dict = {}
    for row in rows:
        if metric in row and not math.isnan(row[metric]):
            setting = {f: row[f] for f in CELL_FIELDS + tuple(OPTIONAL_AXES)
                       if f in row and f != "steps"}
            groups.setdefault(tuple(setting.items()), []).append(row)
    out = []
    for setting, group in groups.items():
        if len({r["steps"] for r in group}) < 2:
            continue
        group = sorted(group, key=lambda r: r["steps"])
        final = group[-1]
        reached = next(r["steps"] for r in group if r[metric] >= fraction * final[metric])
        out.append({**dict(setting),
                    "max_steps": final["steps"], f"{metric}_at_max": final[metric],
                    "steps_to_95pct" if fraction == 0.95 else f"steps_to_{fraction:g}": reached})
    return out


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row[c] for c in columns})


def _format(value: Any, column: str) -> str:
    if isinstance(value, float) and column not in ("cfg_scale", *OPTIONAL_AXES):
        if math.isnan(value):
            return "–"
        return f"{value:.3g}" if column == "sec_per_image" else f"{value:.3f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c in ("sampler", "variant") else "---:" for c in columns)
             + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(row[c], c) for c in columns) + " |")
    return "\n".join(lines)


def write_markdown(path: str, config, sweep: Sweep, columns, rows, grids, plots, out_dir) -> None:
    judged = [p for p in sweep.prompts if is_shapes_prompt(p)]
    text = [f"# Ablation: {config.model or 'model'}", "",
            f"{len(sweep.prompts)} prompts ({len(judged)} judged as shapes prompts), seeds "
            f"{', '.join(map(str, sweep.seeds))}, {sweep.width}x{sweep.height}"
            + (f", negative prompt {sweep.negative_prompt!r}" if sweep.negative_prompt else "")
            + (f", CLIP score by {config.clip_model}" if "clip_score" in columns else "") + ".",
            "",
            "Columns: `acc_*` share of judged images with that attribute right, `all_correct` "
            "all of them; `diversity` mean pairwise RMS pixel distance across seeds (0 = "
            "identical); `clip_score` 100·max(cos, 0); `sec_per_image` after compilation.", "",
            markdown_table(columns, rows), ""]
    needed = steps_to_fraction(rows)
    if needed:
        text += ["## Steps each setting needs", "",
                 "The fewest swept steps whose `all_correct` reaches 95% of its value at the most "
                 "steps swept.", "", markdown_table(list(needed[0]), needed), ""]
    if plots:
        text += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})"
                                    for p in plots] + [""]
    if grids:
        text += ["## Grids", ""] + [f"- [{os.path.basename(g['file'])}]({g['file']})"
                                    for g in grids]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")


# --- grids -----------------------------------------------------------------------------------------

def _axis_values(sweep: Sweep, axis: str) -> list:
    return {"sampler": list(sweep.samplers), "steps": list(sweep.steps),
            "variant": [v.name for v in sweep.variants], "cfg_scale": list(sweep.cfg_scales),
            **{a: list(getattr(sweep, field)) for a, field in OPTIONAL_AXES.items()},
            "prompt": list(sweep.prompts), "seed": list(sweep.seeds)}[axis]


def axis_label(axis: str, value: Any, limit: int = 48) -> str:
    if axis == "steps":
        return f"{value} steps"
    if axis == "cfg_scale":
        return f"CFG {value:g}"
    if axis == LORA_WEIGHT:
        return f"LoRA {value:g}"
    if axis == CONTROL_SCALE:
        return f"ControlNet {value:g}"
    if axis == EMBEDDED_GUIDANCE:
        return f"Distilled CFG {value:g}"
    if axis == "seed":
        return f"seed {value}"
    text = str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def axis_labels(axis: str, values: Sequence, limit: int = 48) -> list[str]:
    """`axis_label` of each value. Samplers of one name that differ in options
    (`flow_euler:shift=1.0`, `flow_euler:shift=3.0`) are labelled by their options when the
    whole strings do not fit, so that narrow columns still tell them apart."""
    if axis == "sampler" and any(len(v) > limit for v in values) and len(
            {parse_sampler(v)[0] for v in values}) == 1:
        values = [v.partition(":")[2] or v for v in values]
    return [axis_label(axis, v, limit) for v in values]


def check_grid_axes(sweep: Sweep, x: str, y: str) -> None:
    """Grid axes `write_grids` can draw for `sweep`: checked before a sweep draws anything."""
    for axis in (x, y):
        if axis not in AXES:
            raise ValueError(f"grid axis {axis!r} is not one of {', '.join(AXES)}")
        if axis in OPTIONAL_AXES and axis not in sweep.optional_axes:
            raise ValueError(f"grid axis {axis!r} needs config.{OPTIONAL_AXES[axis]}")
    if x == y:
        raise ValueError(f"grid axes must differ, both are {x!r}")


def write_grids(out_dir: str, sweep: Sweep, records: Sequence[dict], x: str, y: str,
                max_prompts: int = 0) -> list[dict]:
    """X/Y plots: columns are values of `x`, rows values of `y`; one file per combination of the
    other settings (prompts in subsets of `max_prompts` when the prompt is an axis). A tile shows
    every seed side by side unless the seed is an axis. Also writes grids/grids.json."""
    check_grid_axes(sweep, x, y)
    index = {_key_of_record(r): r for r in records}
    fixed_axes = [a for a in AXES if a not in (x, y) and a != "seed"
                  and (a not in OPTIONAL_AXES or a in sweep.optional_axes)]
    prompt_subsets = [list(sweep.prompts)]
    if "prompt" in (x, y) and max_prompts > 0:
        prompt_subsets = [list(sweep.prompts[i:i + max_prompts])
                          for i in range(0, len(sweep.prompts), max_prompts)]
    folder = os.path.join(out_dir, "grids")
    _clear(folder, "grid_")
    grids = []
    for subset_index, prompts in enumerate(prompt_subsets):
        values = {a: _axis_values(sweep, a) for a in AXES}
        values["prompt"] = prompts
        for fixed in itertools.product(*(values[a] for a in fixed_axes)):
            setting = dict(zip(fixed_axes, fixed))
            tiles = []
            for row_value in values[y]:
                for col_value in values[x]:
                    where = {**setting, y: row_value, x: col_value}
                    cell = Cell(*(where.get(f) for f in CELL_FIELDS + tuple(OPTIONAL_AXES)))
                    record = index[_record_key(cell, where["prompt"])]
                    images = _load_images(out_dir, record)
                    if "seed" in where:
                        tiles.append(images[sweep.seeds.index(where["seed"])])
                    else:  # every seed, side by side
                        tiles.append(images_lib.grid(list(images), rows=1, pad=0))
            col_labels = axis_labels(x, values[x], limit=max(4, tiles[0].shape[1] // 6))
            row_labels = axis_labels(y, values[y])
            canvas = images_lib.grid(tiles, rows=len(values[y]), row_labels=row_labels,
                                     col_labels=col_labels)
            name_parts = [f"{a}-{prompt_id(v) if a == 'prompt' else _slug(str(v), 32)}"
                          for a, v in setting.items()]
            if "prompt" in (x, y) and len(prompt_subsets) > 1:
                name_parts.append(f"prompts{subset_index}")
            name = f"grid_{y}_x_{x}" + "".join("_" + p for p in name_parts) + ".png"
            path = os.path.join(folder, name)
            images_lib.save_png(canvas, path)
            grids.append({"file": os.path.relpath(path, out_dir), "x": x, "y": y,
                          "fixed": setting, "rows": len(values[y]), "cols": len(values[x]),
                          "row_labels": row_labels, "col_labels": col_labels,
                          "tiles": len(tiles), "seeds_per_tile": 1 if "seed" in (x, y)
                          else len(sweep.seeds), "tile_size": list(tiles[0].shape[:2])})
    runs.write_json_atomically(os.path.join(folder, "grids.json"), grids)
    return grids


# --- plots -----------------------------------------------------------------------------------------

def write_plots(folder: str, sweep: Sweep, rows: Sequence[dict],
                columns: Sequence[str]) -> list[str]:
    """all_correct (else clip_score) and diversity against the guidance scale (a panel per step
    count) and against steps (a panel per scale), a line per sampler and variant. Needs
    matplotlib; without it, a warning and no plots."""
    metrics_to_plot = [m for m in ("all_correct", "clip_score", "diversity") if m in columns]
    if "all_correct" in metrics_to_plot and "clip_score" in metrics_to_plot:
        metrics_to_plot.remove("clip_score")
    if not metrics_to_plot:
        return []
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logging.warning("matplotlib is not installed: no plots written (pip install matplotlib)")
        return []
    _clear(folder, "")
    paths = []
    for metric in metrics_to_plot:
        for x, panel in (("cfg_scale", "steps"), ("steps", "cfg_scale")):
            panels = _axis_values(sweep, panel)
            figure = Figure(figsize=(4 * len(panels), 3.4), layout="constrained")
            FigureCanvasAgg(figure)
            axes = figure.subplots(1, len(panels), squeeze=False)[0]
            for ax, panel_value in zip(axes, panels):
                for sampler, variant, *optional in itertools.product(
                        sweep.samplers, sweep.variants,
                        *(getattr(sweep, field) for field in OPTIONAL_AXES.values())):
                    setting = dict(zip(OPTIONAL_AXES, optional))
                    line = sorted((r[x], r[metric]) for r in rows if r["sampler"] == sampler
                                  and r["variant"] == variant.name and r[panel] == panel_value
                                  and all(r.get(a) == v for a, v in setting.items()))
                    label = sampler if len(sweep.variants) == 1 else f"{sampler} / {variant.name}"
                    for axis, value in setting.items():
                        if value is not None:
                            label += " / " + axis_label(axis, value)
                    ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=label)
                ax.set_title(axis_label(panel, panel_value))
                ax.set_xlabel("guidance scale" if x == "cfg_scale" else "steps")
                ax.set_ylabel(metric)
                ax.grid(alpha=0.3)
                if metric != "clip_score":  # shares and distances live in [0, 1]
                    ax.set_ylim(-0.03, 1.03)
            axes[-1].legend(fontsize="small")
            name = f"{metric}_vs_{'guidance' if x == 'cfg_scale' else 'steps'}.png"
            path = os.path.join(folder, name)
            figure.savefig(path, dpi=100)
            paths.append(path)
    return paths
