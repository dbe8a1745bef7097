"""Many images from a prompt file: what `experiments/sample.py` runs.

The work is a deterministic list of jobs, one per (prompt index, image index), each with a fixed
seed and output path `DIR/<prompt index:05d>/<image index:04d>-<seed>.png`:

- Prompt p's seed is its own `seed` field, else `config.seed + p * config.num_images`, so adding
  or editing other lines never moves it; image i of the prompt uses seed + i.
- Jobs with equal static settings (`SamplingSpec` and the prompt's number of 77-token chunks),
  equal LoRAs (`config.loras`, the line's `loras`, its prompt's `<lora:...>` tags) and the same
  ControlNets (the config's or the line's `controlnet`) are cut into batches of `batch_size` rows,
  each compiled program serving every batch of its group (LoRAs of the same ranks and targets, and
  ControlNets of the same configs, share a program: their weights are data). Control images,
  scales, start/end and preprocessors are data too: lines differing only in those share batches.
  Grouping by chunk count keeps an image exactly what `experiments/generate.py` draws for that
  prompt and seed, whatever else is in the file.
- Every host runs every batch as one global program over all devices (`jax.distributed`); the rows
  a host's devices hold are its share of the batch, and it writes only those files.
- Resume: a batch runs when any of its files is missing (all hosts agree on the list before the
  first batch), with the same rows in the same places as in an uninterrupted run, so a missing
  image comes out bit-identical; only missing files are written, each atomically (temp + rename).
  An image's manifest line records its LoRAs (name, weights, file hash) and ControlNets (name,
  files' hash, control image and its contents' hash, scale, start/end, preprocessor), so an image
  drawn with another LoRA, weight, LoRA file, ControlNet or control image is never taken for this
  run's.
  `manifest.jsonl` (per host, `manifest-<i>-of-<n>.jsonl`, on several hosts) gets one line per
  written image, appended in one write per batch; files found without a line get theirs on restart.
  The file handling (atomic writes, the ledger, the settings check) is `sdjax.runs`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time
import types
import zlib
from typing import Any, Hashable, Iterable, Optional, Sequence

import jax
import numpy as np
from absl import logging

from sdjax import images as images_lib
from sdjax import parallel
from sdjax import runs
from sdjax.diffusion import samplers as samplers_lib
from sdjax.sampling import controls as controls_lib
from sdjax.sampling import generate
from sdjax.sampling import loras as loras_lib
from sdjax.sampling.exported import enable_compilation_cache
from sdjax.sampling.requests import Request
from sdjax.sampling.spec import SamplingSpec

PROMPT_FIELDS = ("prompt", "negative_prompt", "seed", "cfg_scale", "steps", "sampler", "num_images",
                 "width", "height", "loras") + generate.CONTROL_FIELDS
MANIFEST = "manifest.jsonl"
CONFIG_FILE = "config.json"
# Config fields that change which images a run draws: resuming into a folder made with other values
# would mix two runs' images, so it is refused.
IMAGE_FIELDS = ("model", "vae", "dtype", "prediction_type", "prompt", "negative_prompt", "seed",
                "num_images", "sampler", "steps", "sampler_options", "cfg_scale", "guidance_rescale",
                "guidance_interval", "clip_skip", "height", "width", "loras", "lora_mode",
                "embeddings_dir") + generate.CONTROL_FIELDS + ("control_guess_mode",) + (
                # SD3 / Flux (a folder written before these existed lacks them: not compared)
                "components", "embedded_guidance", "max_sequence_length", "slg_layers",
                "slg_scale", "slg_start", "slg_stop")
MAX_SEED = 2 ** 32  # seeds are uint32 on the device


class PromptFileError(ValueError):
    """A prompt file line that cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt of the file with every setting resolved (the config fills what the line omits)."""
    prompt: str
    negative_prompt: str
    seed: int
    cfg_scale: float
    steps: int
    sampler: str
    num_images: int
    width: int
    height: int
    line: int  # 1-based line in the prompt file, for error messages
    # The line's `loras` (after config.loras): "NAME[:UNET_WEIGHT[:TE_WEIGHT]]" strings or
    # [name, unet_weight(, te_weight)] lists, as `Request.adapters` takes them.
    loras: tuple = ()
    # The line's ControlNet fields (each defaulting to the config's) as `Request.controls`.
    controls: tuple = ()


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to draw: `index` is its place in the run's job list."""
    index: int
    prompt_index: int
    image_index: int
    seed: int

    @property
    def path(self) -> str:
        """Output path relative to the output folder."""
        return os.path.join(f"{self.prompt_index:05d}", f"{self.image_index:04d}-{self.seed}.png")


@dataclasses.dataclass(frozen=True)
class Batch:
    """One program call: `key` names its static settings, `jobs` fill its first rows, the rest of
    its `size` rows are padding (computed, never written)."""
    key: Hashable
    jobs: tuple[Job, ...]
    size: int

    def share(self, process_index: int, num_processes: int) -> tuple[Job, ...]:
        """The jobs in the rows this process's devices hold (a contiguous block of the batch)."""
        rows = self.size // num_processes
        return self.jobs[process_index * rows:(process_index + 1) * rows]


# --- the prompt file --------------------------------------------------------------------------------

def read_prompts(path: str | os.PathLike, defaults: Any) -> list[Prompt]:
    """Prompts from a text file (one per line) or, for `.jsonl`, one JSON object per line with any of
    `PROMPT_FIELDS`; blank lines and lines starting with `#` are skipped in both.

    `defaults` is the generation config: it supplies every field a line leaves out.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    jsonl = path.endswith(".jsonl")
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            fields = _json_line(path, number, text) if jsonl else {"prompt": text}
            entries.append(_resolve(path, number, fields, defaults, len(entries)))
    if not entries:
        raise PromptFileError(f"{path}: no prompts (every line is blank or a # comment)")
    return entries


def _json_line(path: str, number: int, text: str) -> dict:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptFileError(
            f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(fields, dict):
        raise PromptFileError(f"{path}:{number}: expected a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(PROMPT_FIELDS))
    if unknown:
        raise PromptFileError(f"{path}:{number}: unknown field {unknown[0]!r}; valid fields: "
                              f"{', '.join(PROMPT_FIELDS)}")
    return fields


def _resolve(path: str, number: int, fields: dict, config: Any, prompt_index: int) -> Prompt:
    where = f"{path}:{number}"

    def get(name, kind, default):
        value = fields.get(name, default)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise PromptFileError(f"{where}: field {name!r} must be {expected}, got {value!r}")
        return value

    num_images = get("num_images", int, int(config.num_images))
    seed = get("seed", int, int(config.seed) + prompt_index * int(config.num_images))
    prompt = Prompt(
        prompt=get("prompt", str, config.prompt),
        negative_prompt=get("negative_prompt", str, config.negative_prompt),
        seed=seed, cfg_scale=float(get("cfg_scale", (int, float), float(config.cfg_scale))),
        steps=get("steps", int, int(config.steps)), sampler=get("sampler", str, config.sampler),
        num_images=num_images, width=get("width", int, int(config.width)),
        height=get("height", int, int(config.height)), line=number,
        loras=generate.config_loras(config) + _line_loras(where, fields.get("loras", [])),
        controls=_line_controls(where, fields, config, os.path.dirname(os.path.abspath(path))))
    if num_images < 1:
        raise PromptFileError(f"{where}: field 'num_images' must be >= 1, got {num_images}")
    if not 0 <= seed or seed + num_images > MAX_SEED:
        raise PromptFileError(f"{where}: seeds {seed}..{seed + num_images - 1} must lie in "
                              f"[0, {MAX_SEED})")
    if prompt.steps < 1:
        raise PromptFileError(f"{where}: field 'steps' must be >= 1, got {prompt.steps}")
    try:  # "NAME" or "NAME:option=value,..." (e.g. "flow_euler:shift=3.0"), as config.sampler
        sampler_name = samplers_lib.parse_sampler(prompt.sampler)[0]
    except ValueError as err:
        raise PromptFileError(f"{where}: {err}") from None
    if sampler_name not in samplers_lib.list_samplers():
        raise PromptFileError(f"{where}: unknown sampler {sampler_name!r}; valid names: "
                              f"{', '.join(samplers_lib.list_samplers())}")
    return prompt


def _line_controls(where: str, fields: dict, config: Any, folder: str) -> tuple:
    """A line's ControlNets. Its relative paths (control images, ControlNets) are found in the
    working directory or, failing that, beside the prompt file (`folder`)."""
    # A line naming no ControlNets ("controlnet": []) draws without: the config's control images
    # and scales belong to the config's ControlNets.
    defaults = {} if fields.get("controlnet") == [] else config

    def beside_file(value):
        if isinstance(value, list):
            return [beside_file(v) for v in value]
        if (isinstance(value, str) and value and not os.path.isabs(value)
                and not os.path.exists(value) and os.path.exists(os.path.join(folder, value))):
            return os.path.join(folder, value)
        return value

    settings = {name: (beside_file(fields[name]) if name in ("control_image", "controlnet")
                       else fields[name]) if name in fields else defaults.get(name)
                for name in generate.CONTROL_FIELDS}
    try:
        return generate.controls_from(settings, directory=config.get("controlnet_dir", ""),
                                      named=lambda name: f"field {name!r}")
    except ValueError as err:
        raise PromptFileError(f"{where}: {err}") from None


def _line_loras(where: str, value) -> tuple:
    if not isinstance(value, list):
        raise PromptFileError(f"{where}: field 'loras' must be a list of \"NAME[:UNET[:TE]]\" "
                              f"strings or [name, unet_weight, te_weight] lists, got {value!r}")
    try:
        return tuple(loras_lib.parse_lora(v) if isinstance(v, str) else loras_lib.lora_entry(v)
                     for v in value)
    except ValueError as err:
        raise PromptFileError(f"{where}: field 'loras': {err}") from None


# --- planning ---------------------------------------------------------------------------------------

def plan_jobs(prompts: Sequence[Prompt]) -> list[Job]:
    """Every image of the run, prompt after prompt."""
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(prompt.num_images):
            jobs.append(Job(index=len(jobs), prompt_index=p, image_index=i, seed=prompt.seed + i))
    return jobs


def plan_batches(jobs: Sequence[Job], key_of: Any, batch_size: int) -> list[Batch]:
    """Jobs grouped by `key_of(job)` (groups in order of first appearance, jobs in order within a
    group), cut into batches of `batch_size` rows; a group's last batch may be partly padding."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    groups: dict[Hashable, list[Job]] = collections.OrderedDict()
    for job in jobs:
        groups.setdefault(key_of(job), []).append(job)
    return [Batch(key=key, jobs=tuple(members[start:start + batch_size]), size=batch_size)
            for key, members in groups.items() for start in range(0, len(members), batch_size)]


def host_jobs(batches: Iterable[Batch], process_index: int, num_processes: int) -> list[Job]:
    """All jobs whose files this process writes."""
    return [job for batch in batches for job in batch.share(process_index, num_processes)]


# --- the run ----------------------------------------------------------------------------------------

def spec_for(base: SamplingSpec, prompt: Prompt) -> SamplingSpec:
    """The static settings of one prompt: the config's, with the prompt file's overrides (a
    sampler's own options over the config's)."""
    name, inline = samplers_lib.parse_sampler(prompt.sampler)
    return dataclasses.replace(base, sampler=name, steps=prompt.steps, width=prompt.width,
                               height=prompt.height,
                               sampler_options=samplers_lib.options_for(
                                   name, {**dict(base.sampler_options), **dict(inline)}),
                               guidance=prompt.cfg_scale != 1.0, progress=False,
                               guess_mode=base.guess_mode and bool(prompt.controls))


class BatchSampler:
    """A loaded model, the run's prompts and its batch plan; `run(out_dir)` draws what is missing."""

    def __init__(self, config: Any, prompts: Sequence[Prompt], model=None):
        if config.init_image or config.mask:
            raise ValueError("sample.py draws txt2img only; --init_image / --mask belong to "
                             "experiments/generate.py")
        if config.subseed >= 0 and config.subseed_strength > 0:
            raise ValueError("variation seeds (config.subseed) are not supported by sample.py")
        if config.parallel != "jit":
            raise ValueError(f"sample.py runs one global jit program; parallel={config.parallel!r} "
                             f"is not supported")
        self.config = config
        self.prompts = list(prompts)
        self.base_spec = generate.spec_from_config(config)
        self.model = model or generate.load_model(config)
        self.generator = generate.make_generator(config, self.model)
        self.mesh = self.generator.mesh
        self.process_index, self.num_processes = jax.process_index(), jax.process_count()
        self.batch_size = int(config.batch_size) or self.mesh.size * self.base_spec.microbatch
        parallel.check_batch_divides(self.batch_size, self.mesh, "config.batch_size: batch")
        self.local_rows = self.batch_size // self.num_processes
        self._check_local_rows()
        self.model_name = os.path.basename(os.path.normpath(self.model.source)) or "model"
        self.specs, self.chunks, self.adapters, self.controlnet_params = [], [], [], []
        for index, prompt in enumerate(self.prompts):
            try:
                # The spec holds the line's ControlNets' configs (loaded once each, by path).
                spec, controlnet_params = self.generator.controlled(
                    self._request(index), spec_for(self.base_spec, prompt))
                spec.validate(self.generator.arch)
                self.specs.append(spec)
                ids = self._row(index)["ids"]
                self._control_row(index)  # its control images readable
                adapters = self.generator.adapters_for(self._request(index))
            except ValueError as err:
                raise ValueError(f"prompt on line {prompt.line}: {err}") from None
            self.chunks.append(ids.shape[2])
            self.adapters.append(adapters)
            self.controlnet_params.append(controlnet_params)
        self.jobs = plan_jobs(self.prompts)
        self.batches = plan_batches(self.jobs, self.key_of, self.batch_size)

    def key_of(self, job: Job) -> Hashable:
        return (self.specs[job.prompt_index], self.chunks[job.prompt_index],
                tuple((w.adapter.name, w.adapter.source, w.unet, w.text_encoder)
                      for w in self.adapters[job.prompt_index]),
                tuple(c.controlnet for c in self.prompts[job.prompt_index].controls))

    def _check_same_plan(self) -> None:
        """Hosts given different prompt files or settings would run different programs and hang."""
        settings = json.loads(self.config.to_json())
        text = json.dumps({name: settings.get(name) for name in IMAGE_FIELDS}) + "\n".join(
            f"{b.key!r} {[j.path for j in b.jobs]}" for b in self.batches)
        digest = np.array([zlib.crc32(text.encode("utf-8")), len(self.batches)], np.int64)
        digests = _gather(digest)
        if (digests != digests[0]).any():
            raise ValueError(f"the processes planned different runs (checksum, batches per process: "
                             f"{digests.tolist()}); give every process the same config and prompts")

    def _check_local_rows(self) -> None:
        """The batch layout assumed by `Batch.share`: process i holds rows [i*L, (i+1)*L)."""
        shards = parallel.batch_sharding(self.mesh).addressable_devices_indices_map((self.batch_size,))
        rows = sorted(r for index in shards.values()
                      for r in range(*index[0].indices(self.batch_size)))
        start = self.process_index * self.local_rows
        if rows != list(range(start, start + self.local_rows)):
            raise ValueError(f"process {self.process_index} holds batch rows {rows[:4]}..., not the "
                             f"contiguous block [{start}, {start + self.local_rows}) sample.py "
                             f"assumes; every process needs the same number of devices")

    def _request(self, prompt_index: int, *, controls: bool = True) -> Request:
        prompt = self.prompts[prompt_index]
        return Request(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None,
                       seed=0, num_images=1, cfg_scale=prompt.cfg_scale,
                       guidance_rescale=float(self.config.guidance_rescale), adapters=prompt.loras,
                       controls=prompt.controls if controls else (),
                       embedded_guidance=float(self.config.get("embedded_guidance", 3.5)),
                       slg_scale=float(self.config.get("slg_scale", 2.8)))

    @functools.lru_cache(maxsize=4096)
    def _row(self, prompt_index: int) -> dict:
        """A prompt's text and guidance arrays; its control arrays are `_control_row`'s."""
        spec = dataclasses.replace(self.specs[prompt_index], controlnets=())
        row = self.generator.prepare(self._request(prompt_index, controls=False), spec)
        if self.generator.arch.family == "sdxl" and "neg_zero" not in row:
            # Rows with and without a negative prompt share batches: a zero keeps the negative.
            row["neg_zero"] = np.zeros((1,), np.float32)
        return row

    # Control images are large (H x W x 3 floats each): only the last prompts' are kept (a prompt's
    # rows are consecutive in the jobs, so each is read once per batch it is in).
    @functools.lru_cache(maxsize=16)
    def _control_row(self, prompt_index: int) -> dict:
        controls = self.prompts[prompt_index].controls
        if not controls:
            return {}
        return controls_lib.control_arrays(controls, self.specs[prompt_index], 1)

    def _local_batch(self, batch: Batch, share: Sequence[Job]) -> dict:
        """Host arrays for this process's rows: its jobs, then copies of the last as padding."""
        rows = list(share) or [batch.jobs[0]]
        rows += [rows[-1]] * (self.local_rows - len(rows))
        parts = [dict(self._row(job.prompt_index), **self._control_row(job.prompt_index),
                      seeds=np.array([job.seed], np.uint32)) for job in rows]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _global(self, local: dict) -> dict:
        sharding = parallel.batch_sharding(self.mesh)
        offset = self.process_index * self.local_rows

        def put(x):
            def rows(index):
                first = index[0].indices(self.batch_size)
                return x[(slice(first[0] - offset, first[1] - offset),) + tuple(index[1:])]
            return jax.make_array_from_callback((self.batch_size,) + x.shape[1:], sharding, rows)

        return {k: put(v) for k, v in local.items()}

    def _local_output(self, out: dict) -> dict:
        """This process's rows of the program's output, in row order."""
        offset = self.process_index * self.local_rows
        result = {}
        for name, array in out.items():
            local = np.empty((self.local_rows,) + array.shape[1:], array.dtype)
            for shard in array.addressable_shards:
                start, stop, _ = shard.index[0].indices(self.batch_size)
                local[start - offset:stop - offset] = np.asarray(shard.data)
            result[name] = local
        return result

    def _parameters_text(self, job: Job) -> str:
        prompt, spec = self.prompts[job.prompt_index], self.specs[job.prompt_index]
        settings = generate.generation_parameters(
            types.SimpleNamespace(cfg_scale=prompt.cfg_scale, seed=job.seed, subseed=-1,
                                  subseed_strength=0.0,
                                  guidance_rescale=self.config.guidance_rescale,
                                  embedded_guidance=self.config.get("embedded_guidance", 3.5),
                                  slg_scale=self.config.get("slg_scale", 2.8)),
            spec, job.seed, self.model_name, self.adapters[job.prompt_index],
            self.generator.adapter_mode, prompt.controls, self.generator.arch)
        return images_lib.format_parameters(prompt.prompt, prompt.negative_prompt, settings)

    def _manifest_record(self, job: Job) -> dict:
        prompt = self.prompts[job.prompt_index]
        record = {
            "path": job.path, "prompt_index": job.prompt_index, "image_index": job.image_index,
            "seed": job.seed, "prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt,
            "cfg_scale": prompt.cfg_scale, "steps": prompt.steps, "sampler": prompt.sampler,
            "width": prompt.width, "height": prompt.height}
        adapters = self.adapters[job.prompt_index]
        if adapters:  # absent without LoRAs, as in manifests written before LoRAs existed
            record["loras"] = [{"name": w.adapter.name, "unet": w.unet, "te": w.text_encoder,
                                "hash": loras_lib.short_hash(w.adapter)} for w in adapters]
            record["lora_mode"] = self.generator.adapter_mode
        if prompt.controls:  # absent without ControlNets, as in manifests written before them
            record["controls"] = [_control_record(c) for c in prompt.controls]
        return record

    def manifest_name(self) -> str:
        if self.num_processes == 1:
            return MANIFEST
        return f"manifest-{self.process_index:05d}-of-{self.num_processes:05d}.jsonl"

    def run(self, out_dir: str, *, progress: bool = True) -> dict:
        """Draw every job of this process whose file is missing. Returns counts and timings."""
        self._check_same_plan()
        os.makedirs(out_dir, exist_ok=True)
        error = None
        try:
            _check_and_write_config(self.config, out_dir)
        except ValueError as err:
            error = err
        # Every process stops if one does, instead of leaving the others waiting in a collective.
        refused = _gather(np.array([error is not None], np.int32))[:, 0]
        if error is not None:
            raise error
        if refused.any():
            raise ValueError(f"process(es) {np.flatnonzero(refused).tolist()} refused to resume into "
                             f"{out_dir} (see their logs)")
        mine = [batch.share(self.process_index, self.num_processes) for batch in self.batches]
        missing = [[job for job in share if not os.path.exists(os.path.join(out_dir, job.path))]
                   for share in mine]
        needed = _any_process(np.array([bool(m) for m in missing], np.int32))
        manifest = os.path.join(out_dir, self.manifest_name())
        absent = {job for miss in missing for job in miss}
        done = [job for share in mine for job in share if job not in absent]
        stale = _stale_images(out_dir, done, self._manifest_record, self._parameters_text)
        refused = _gather(np.array([bool(stale)], np.int32))[:, 0]
        if stale:
            raise ValueError(
                f"{out_dir} holds {len(stale)} image(s) drawn from other prompt-file lines than "
                f"this run's (the file changed since): {'; '.join(stale[:3])}"
                f"{'; ...' if len(stale) > 3 else ''}. Use another --out_dir, or delete those "
                f"images to draw them again")
        if refused.any():
            raise ValueError(f"process(es) {np.flatnonzero(refused).tolist()} found images of an "
                             f"edited prompt file in {out_dir} (see their logs)")
        _reconcile_manifest(out_dir, manifest, done, self._manifest_record)
        total_mine = sum(len(s) for s in mine)
        todo = sum(len(m) for m in missing)
        logging.info("process %d/%d: %d job(s) in %d batch(es) of %d; %d already written, %d to draw "
                     "in %d batch(es)", self.process_index, self.num_processes, total_mine,
                     len(self.batches), self.batch_size, total_mine - todo, todo, int(needed.sum()))
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total_mine, initial=total_mine - todo, unit="img",
                       desc=f"host {self.process_index}" if self.num_processes > 1 else "images")
        stats = {"written": 0, "skipped": total_mine - todo, "non_finite": 0, "batches": 0}
        started = time.perf_counter()
        pending = None
        # One batch in flight: the next batch is dispatched before the previous one's images are
        # fetched and encoded, so PNG writing overlaps device work.
        for b in [b for b in range(len(self.batches)) if needed[b]] + [None]:
            dispatched = None
            if b is not None:
                batch = self.batches[b]
                spec = batch.key[0]
                local = self._local_batch(batch, mine[b])
                global_batch = self._global(local)
                first = batch.jobs[0].prompt_index
                params = self.generator.params_for(self.adapters[first],
                                                   self.controlnet_params[first])
                # Generator's program: exported and reloaded across launches where it can be.
                program = self.generator.program_for(spec, global_batch, params)
                dispatched = (b, program(params, global_batch))
            if pending is not None:
                written = self._write(out_dir, manifest, mine[pending[0]], missing[pending[0]],
                                      self._local_output(pending[1]), stats)
                stats["batches"] += 1
                if bar is not None:
                    bar.update(written)
                elapsed = time.perf_counter() - started
                logging.log_every_n_seconds(
                    logging.INFO, "%d image(s) written in %.1f s (%.2f images/s)", 30,
                    stats["written"], elapsed, stats["written"] / max(elapsed, 1e-9))
            pending = dispatched
        if bar is not None:
            bar.close()
        stats["seconds"] = time.perf_counter() - started
        stats["images_per_second"] = stats["written"] / max(stats["seconds"], 1e-9)
        logging.info("process %d: wrote %d image(s) in %.1f s (%.2f images/s), %d program trace(s)",
                     self.process_index, stats["written"], stats["seconds"],
                     stats["images_per_second"], self.generator.traces)
        if stats["non_finite"]:
            logging.error("%d image(s) had NaN/inf latents and were not written; lower the "
                          "guidance scale, use float32, or check the checkpoint", stats["non_finite"])
        _barrier("sdjax.sampling.batches.done")
        return stats

    def _write(self, out_dir: str, manifest: str, share, missing, out: dict, stats: dict) -> int:
        missing = set(missing)
        pixels = images_lib.to_uint8(out["images"])
        records = []
        for row, job in enumerate(share):
            if job not in missing:
                continue
            if not out["finite"][row]:
                logging.error("prompt %d image %d (seed %d): NaN/inf latents, not written",
                              job.prompt_index, job.image_index, job.seed)
                stats["non_finite"] += 1
                continue
            path = os.path.join(out_dir, job.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            images_lib.save_png(pixels[row], path, self._parameters_text(job))
            records.append(self._manifest_record(job))
        runs.append_jsonl(manifest, *records)  # one write per batch: its lines land whole or not
        stats["written"] += len(records)
        return len(records)


def _control_record(control: controls_lib.Control) -> dict:
    """What an image's manifest line says of one of its ControlNets: the files' contents, not only
    their names, so a retrained ControlNet or a redrawn control image makes the image stale."""
    return {"controlnet": generate.controlnet_name(control.controlnet),
            "hash": generate.contents_hash(generate.controlnet_files(control.controlnet)),
            "image": control.image, "image_hash": generate.contents_hash([control.image]),
            "scale": control.scale, "start": control.start, "end": control.end,
            "preprocess": control.preprocess}


def sample_to_dir(config, prompts_path: str | os.PathLike, out_dir: Optional[str] = None, *,
                  model=None) -> dict:
    """Read the prompt file, plan the run and draw every missing image of this process into
    `out_dir` (default `config.out_dir`). Returns the counts of `BatchSampler.run`."""
    enable_compilation_cache(os.path.expanduser(config.compilation_cache))
    prompts = read_prompts(prompts_path, config)
    sampler = BatchSampler(config, prompts, model=model)
    return sampler.run(out_dir or config.out_dir, progress=bool(config.progress))


# --- files ------------------------------------------------------------------------------------------

def _is_manifest(name: str) -> bool:
    return name == MANIFEST or (name.startswith("manifest-") and name.endswith(".jsonl"))


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """Every line of every manifest in `out_dir` (a torn last line, if any, is skipped)."""
    return [entry for name in sorted(os.listdir(out_dir)) if _is_manifest(name)
            for entry in runs.read_jsonl(os.path.join(out_dir, name))]


def _stale_images(out_dir: str, done: Sequence[Job], record_of, text_of) -> list[str]:
    """The images already in `out_dir` that another job drew (a resumed run whose prompt file
    was edited): each image's manifest line, or for an image the manifest never got, its PNG
    parameters, must be what this run would write for it."""
    recorded = {entry.get("path"): entry for entry in read_manifest(out_dir)}
    stale = []
    for job in done:
        want = record_of(job)
        entry = recorded.get(job.path)
        if entry is not None:
            changed = [k for k, v in want.items() if entry.get(k) != v]
            if changed:
                stale.append(f"{job.path}: " + ", ".join(
                    f"{k} {entry.get(k)!r} -> {want[k]!r}" for k in changed))
        elif images_lib.read_parameters(os.path.join(out_dir, job.path)) != text_of(job):
            stale.append(f"{job.path}: its PNG parameters are not what prompt "
                         f"{job.prompt_index} draws now")
    return stale


def _reconcile_manifest(out_dir: str, manifest: str, done: Sequence[Job], record_of) -> None:
    """Remove a torn last line (so the next append starts a line of its own) and add lines for
    images written by a run killed before it appended them."""
    runs.repair_jsonl(manifest)
    if not done:
        return
    listed = {entry.get("path") for entry in read_manifest(out_dir)}
    runs.append_jsonl(manifest, *(record_of(job) for job in done if job.path not in listed))


def _check_and_write_config(config, out_dir: str) -> None:
    """Refuse to resume into a folder drawn with other image settings; write the resolved config.
    Every process writes the same file: `runs` gives each its own temporary file."""
    current = json.loads(config.to_json())
    runs.check_fingerprint(os.path.join(out_dir, CONFIG_FILE),
                           {name: current.get(name) for name in IMAGE_FIELDS},
                           "this folder holds images", remedy="use another --out_dir",
                           record=current)


def _gather(values: np.ndarray) -> np.ndarray:
    """(processes, n): every process's `values` (every process must call it with the same n)."""
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)


def _any_process(flags: np.ndarray) -> np.ndarray:
    """Elementwise OR of `flags` over processes."""
    return _gather(flags).any(axis=0)


def _barrier(name: str) -> None:
    # The coordinator lives in process 0: no process may leave while others still draw.
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
