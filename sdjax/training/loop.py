"""The training loop: model + data + train step + checkpoints + logs, driven by one config
(see configs/train_tiny.py for every field).

Counting: the loop's `step` is the number of `train_step` calls made (batches consumed), the
number checkpoints are named by and `total_steps` counts; `TrainState.step` counts the updates that
were applied (they differ only by the skipped non-finite steps). Step i's key is
`fold_in(run_key, i)` and its batch is the dataset's i-th, both restored with a checkpoint, so a
resumed run continues bit-identically.

Only process 0 writes logs, metrics, samples and exports; every process computes and takes part in
checkpoints. Metrics go to stdout (absl logging), `<workdir>/metrics.jsonl` and TensorBoard event
files in `<workdir>/tensorboard` (tensorboardX: no tensorflow needed).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sdjax import images as images_lib
from sdjax import parallel, runs
from sdjax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from sdjax.weights.presets import random_pretrained
from sdjax.weights.architecture import Architecture
from sdjax.text.tokenizer import CLIPTokenizer
from sdjax.training import controlnet as controlnet_lib
from sdjax.training import flow as flow_lib
from sdjax.training import lora
from sdjax.training import step as step_lib
from sdjax.training import textual_inversion
from sdjax.training.checkpoints import Checkpoints
from sdjax.training.data import ImageCaptionDataset
from sdjax.training.state import (EMAConfig, TrainState, cast_for_compute, init_train_state,
                                  make_optimizer, optimizer_steps)
from sdjax.weights.clip import save_clip_native
from sdjax.weights.pretrained import Pretrained, load_pretrained, save_pretrained

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MetricsWriter:
    """One metrics record per logging step to `metrics.jsonl` and to TensorBoard scalars."""

    def __init__(self, workdir: str, resumed_step: int = 0):
        from tensorboardX import SummaryWriter

        self._path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self._path):
            # Records past the restored checkpoint (written before a crash) are replayed by this
            # run: drop them, so every step appears once and matches the state it came from.
            runs.write_jsonl_atomically(self._path, [r for r in runs.read_jsonl(self._path)
                                                     if r.get("step", 0) <= resumed_step])
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, record: dict) -> None:
        runs.append_jsonl(self._path, record)
        for name, value in record.items():
            if name != "step":
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        self._tensorboard.close()


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the last good state was saved."""


@dataclasses.dataclass
class Setup:
    """What a run is built from: the models (as a Pretrained for ldm/flow/vae), the task, the
    state, for the clip objective with hard negatives, the function that writes them, for a LoRA run
    its network, name and what its exported files say of the run (kohya's `ss_*` keys), for a
    textual-inversion run its token (`model` then knows it), and for a ControlNet run the
    ControlNet's config (its params are the state's group "controlnet")."""
    task: Any
    state: TrainState
    model: Optional[Pretrained]
    tokenizer: Any
    hard_negative_captions: Optional[Callable[[str, np.random.Generator, int], list[str]]] = None
    network: Optional[lora.Network] = None
    lora_name: str = ""
    run_metadata: dict = dataclasses.field(default_factory=dict)
    inversion: Optional[textual_inversion.Inversion] = None
    controlnet: Optional[controlnet_lib.ControlNetConfig] = None

    @property
    def adapter(self):
        """What a LoRA or textual-inversion run trains (`groups`, `inference_params`), or None."""
        return self.network if self.network is not None else self.inversion


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"compute_dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def clip_config(config: ml_collections.ConfigDict) -> CLIPConfig:
    """The CLIPConfig of the clip objective's model, from `config.clip` and the data resolution."""
    c = config.clip
    text = CLIPTextConfig(vocab_size=49408, hidden_size=c.hidden_size,
                          intermediate_size=4 * c.hidden_size, num_layers=c.layers,
                          num_heads=c.heads, projection_dim=c.projection_dim)
    vision = CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=4 * c.hidden_size,
                              num_layers=c.layers, num_heads=c.heads,
                              image_size=config.data.resolution, patch_size=c.patch_size,
                              projection_dim=c.projection_dim)
    return CLIPConfig(text=text, vision=vision)


def import_function(path: str) -> Callable:
    """The function a "package.module:function" string names. Configs name code this way, so
    that loading a config imports nothing and the loop does not know whose function it runs."""
    module, sep, name = path.partition(":")
    if not (sep and module and name):
        raise ValueError(f"{path!r} is not \"package.module:function\"")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from None


def build(config: ml_collections.ConfigDict) -> Setup:
    """Models (loaded from `init_from` or random), the objective's task and a fresh train state
    (host arrays; the loop places it on the mesh)."""
    if config.objective not in step_lib.OBJECTIVES:
        raise ValueError(f"objective {config.objective!r} is not one of {step_lib.OBJECTIVES}")
    dtype = _dtype(config.compute_dtype)
    model, negatives, inversion, controlnet = None, None, None, None
    adapters = [name for name in ("lora", "textual_inversion", "controlnet") if config[name].use]
    if len(adapters) > 1:
        raise ValueError(f"{' and '.join(f'{a}.use' for a in adapters)} are "
                         f"{'both' if len(adapters) == 2 else 'all'} set: a run trains one")
    if config.controlnet.use and config.objective != "ldm":
        raise ValueError(f"controlnet.use trains a ControlNet with the ldm objective, not "
                         f"{config.objective!r}")
    if config.textual_inversion.use and config.objective != "ldm":
        raise ValueError(f"textual_inversion.use learns a token with the ldm objective, not "
                         f"{config.objective!r}")
    if config.objective == "clip":
        if config.clip.hard_negatives:
            if not config.clip.hard_negative_captions:
                raise ValueError("config.clip.hard_negatives is set but "
                                 "config.clip.hard_negative_captions names no function "
                                 "(\"package.module:function\") that writes them")
            negatives = import_function(config.clip.hard_negative_captions)
        model_config = clip_config(config)
        tokenizer = CLIPTokenizer.default()
        s = config.data.resolution
        params = {"clip": CLIPModel(model_config).init(
            jax.random.key(config.seed), np.zeros((1, 77), np.int32),
            np.zeros((1, s, s, 3), np.float32))["params"]}
        task = step_lib.CLIPTask(model_config, dtype=dtype, remat=config.remat)
    else:
        if config.init_from:
            model = load_pretrained(config.init_from, vae=config.vae or None)
        else:
            # A LoRA or a new token adapts a model whose every layer contributes; the start of a run
            # from scratch zeroes the residual branches' last layers and the U-Net's output.
            model = random_pretrained(config.preset, seed=config.seed,
                                      for_training=not adapters)
        if config.objective == "ldm" and config.ldm.prediction_type:
            # Exports and preview grids sample with the parameterisation being trained.
            model = dataclasses.replace(model, scheduler_config={
                **model.scheduler_config, "prediction_type": config.ldm.prediction_type})
        if config.textual_inversion.use:
            # From here on the model knows the token: the captions' tokenizer, the objective's
            # architecture (its token tables' sizes) and the sample grids use it.
            inversion, model = textual_inversion.make_inversion(
                model, textual_inversion.textual_inversion_config(
                    config.textual_inversion.to_dict(), exclude=TEXTUAL_INVERSION_RUN_FIELDS))
        arch = Architecture.of(model, dtype)
        if config.objective in ("ldm", "flow") and arch.flow != (config.objective == "flow"):
            kind = "a flow-matching transformer" if arch.flow else "a U-Net"
            raise ValueError(f"objective {config.objective!r} does not train this {model.family} "
                             f"model ({kind}): use objective "
                             f"{'flow' if arch.flow else 'ldm'!r}")
        if config.objective == "vae":
            params = {"vae": model.params["vae"]}
            tokenizer = None
            task = step_lib.VAETask(arch, kl_weight=config.vae_loss.kl_weight,
                                    reconstruction_loss=config.vae_loss.reconstruction,
                                    remat=config.remat)
        elif config.objective == "flow":
            params = dict(model.params)
            settings = flow_settings(config)
            tokenizer = flow_lib.flow_tokenizer(model.tokenizers, flow_lib.sequence_length(
                model.family, settings.get("max_sequence_length", 0)))
            task = flow_lib.flow_task(arch, tokenizer, settings, remat=config.remat)
        else:
            params = dict(model.params)
            tokenizers = model.tokenizers

            def tokenizer(captions):  # (B, encoders, 1 chunk, 77)
                return np.stack([t(captions) for t in tokenizers], axis=1)[:, :, None]

            task = step_lib.LDMTask(
                arch, empty_ids=tokenizer([""])[0],
                prediction_type=config.ldm.prediction_type or arch.schedule.prediction_type,
                snr_gamma=config.ldm.snr_gamma or None, offset_noise=config.ldm.offset_noise,
                caption_dropout=config.ldm.caption_dropout, clip_skip=config.ldm.clip_skip,
                remat=config.remat)
    groups = config.optimizer.groups.to_dict()
    network = None
    if config.lora.use:
        if config.objective not in ("ldm", "flow"):
            raise ValueError(f"lora.use trains a LoRA with the ldm or flow objective, not "
                             f"{config.objective!r}")
        settings = lora.lora_config(config.lora.to_dict(), exclude=LORA_RUN_FIELDS)
        network = lora.make_network(model.params, model.unet_config, settings, model.family)
        if jnp.dtype(dtype) != jnp.float32:
            # The frozen base is only ever read in the compute dtype: held so (kohya's weight
            # dtype), it takes half the memory and no cast per step.
            params = cast_for_compute(params, dtype)
        params.update(network.init(config.seed))
        task = lora.LoRATask(task, network)
        groups = lora_groups(groups, network)
    if config.controlnet.use:
        settings = controlnet_lib.controlnet_settings(config.controlnet.to_dict(),
                                                      exclude=CONTROLNET_RUN_FIELDS)
        if config.ldm.caption_dropout:
            raise ValueError("ldm.caption_dropout is set on a ControlNet run: its captions are "
                             "dropped at controlnet.caption_dropout (set ldm.caption_dropout=0)")
        groups = controlnet_lib.controlnet_groups(groups, settings)
        if jnp.dtype(dtype) != jnp.float32:  # as a LoRA run's frozen base
            params = {name: sub if name in groups and not groups[name].get("frozen", False)
                      else cast_for_compute(sub, dtype) for name, sub in params.items()}
        weights = controlnet_lib.init_controlnet(model, settings, config.seed)
        controlnet = weights.config
        params[controlnet_lib.GROUP] = weights.params
        task = controlnet_lib.ControlNetTask(task, controlnet,
                                             caption_dropout=settings.caption_dropout,
                                             control_dropout=settings.control_dropout)
    if inversion is not None:
        params = inversion.split(params)
        rows = params.pop(textual_inversion.GROUP)
        if jnp.dtype(dtype) != jnp.float32:  # as a LoRA run's frozen base
            params = cast_for_compute(params, dtype)
        params[textual_inversion.GROUP] = rows
        task = textual_inversion.TextualInversionTask(task, inversion)
        groups = textual_inversion.check_groups(groups)
    unknown = sorted(set(groups) - set(params))
    if unknown:
        raise ValueError(f"optimizer.groups names {unknown}, but the {config.objective} objective "
                         f"trains only {sorted(params)}")
    groups = {name: groups.get(name, {"frozen": True}) for name in params}
    accumulate = config.optimizer.accumulate_steps
    optimizer = make_optimizer(groups, total_steps=max(config.total_steps // accumulate, 1),
                               grad_clip_norm=config.optimizer.grad_clip_norm or None,
                               accumulate_steps=accumulate)
    ema = EMAConfig(decay=config.ema.decay, warmup=config.ema.warmup) if config.ema.use else None
    state = init_train_state(params, optimizer, jax.random.key(config.seed), use_ema=config.ema.use,
                             ema=ema)
    setup = Setup(task=task, state=state, model=model, tokenizer=tokenizer,
                  hard_negative_captions=negatives, network=network, inversion=inversion,
                  controlnet=controlnet)
    if network is not None:
        setup.lora_name = config.lora.output_name
        if config.objective == "ldm":  # diffusers' LoRA files of the flow families carry none
            setup.run_metadata = kohya_run_metadata(config)
    return setup


def flow_settings(config: ml_collections.ConfigDict) -> dict:
    """The flow objective's settings (`config.flow`, configs/train_flow_tiny.py); a config
    without that section trains with `training.flow.FlowTask`'s defaults."""
    return config.flow.to_dict() if "flow" in config else {}


# Fields of `config.lora` that the loop reads itself; the others are `lora.LoRAConfig`'s.
LORA_RUN_FIELDS = ("use", "output_name")
TEXTUAL_INVERSION_RUN_FIELDS = ("use",)
CONTROLNET_RUN_FIELDS = ("use",)


def lora_groups(groups: dict, network: lora.Network) -> dict:
    """The optimizer groups of a LoRA run: one per adapted model ("lora_unet", ...), the second
    text encoder's defaulting to the first's (kohya's one text_encoder_lr); groups of LoRAs the
    run does not train are dropped (`lora.train_text_encoder=False` needs no edit of the groups),
    and the base models stay frozen."""
    trained = [name for name, group in groups.items()
               if not name.startswith(lora.GROUP_PREFIX) and not group.get("frozen", False)]
    if trained:
        raise ValueError(f"optimizer.groups trains {trained}, but a LoRA run (lora.use) trains "
                         f"only its LoRA groups ({', '.join(network.groups)}); the base models "
                         f"stay frozen")
    first, second = (lora.group_name(m) for m in ("text_encoder", "text_encoder_2"))
    if second in network.groups and second not in groups and first in groups:
        groups[second] = groups[first]
    missing = [g for g in network.groups if g not in groups]
    if missing:
        raise ValueError(f"optimizer.groups has no group for {missing}: give each LoRA its "
                         f"learning rate (kohya's unet_lr / text_encoder_lr)")
    return {name: group for name, group in groups.items()
            if not name.startswith(lora.GROUP_PREFIX) or name in network.groups}


def kohya_run_metadata(config: ml_collections.ConfigDict) -> dict:
    """What kohya's `ss_*` metadata says of the run itself (the network's and optimizer's keys
    come from `lora.kohya_metadata`)."""
    accumulate = config.optimizer.accumulate_steps
    r = config.data.resolution
    return {
        "ss_output_name": config.lora.output_name,
        "ss_training_started_at": time.time(),
        "ss_sd_model_name": os.path.basename(os.path.normpath(config.init_from))
        if config.init_from else f"random:{config.preset}",
        "ss_vae_name": os.path.basename(os.path.normpath(config.vae)) if config.vae else None,
        "ss_max_train_steps": config.total_steps // accumulate,
        "ss_gradient_accumulation_steps": accumulate,
        "ss_total_batch_size": config.data.batch_size * accumulate,
        "ss_batch_size_per_device": config.data.batch_size // jax.device_count(),
        "ss_resolution": f"({r}, {r})",
        "ss_seed": config.seed,
        "ss_mixed_precision": {"float32": "no", "bfloat16": "bf16"}[config.compute_dtype],
        "ss_gradient_checkpointing": config.remat,
        "ss_max_grad_norm": config.optimizer.grad_clip_norm or None,
        "ss_clip_skip": config.ldm.clip_skip or None,
        "ss_noise_offset": config.ldm.offset_noise or None,
        "ss_min_snr_gamma": config.ldm.snr_gamma or None,
        "ss_caption_dropout_rate": config.ldm.caption_dropout,
        "ss_cache_latents": config.data.use_latents,
        "ss_flip_aug": config.data.random_flip,
    }


def hard_negative_ids(captions: list[str], tokenizer,
                      hard_negative_captions: Callable[[str, np.random.Generator, int], list[str]],
                      count: int, rng: np.random.Generator) -> np.ndarray:
    """(B, count, 77) token ids of `count` hard negatives per caption, written by
    `hard_negative_captions(caption, rng, count)` (the function `config.clip.hard_negative_captions`
    names): the captions the CLIP objective also scores each image against."""
    negatives = [n for c in captions for n in hard_negative_captions(c, rng, count)]
    return np.asarray(tokenizer(negatives)).reshape(len(captions), count, -1)


def make_dataset(config: ml_collections.ConfigDict, tokenizer,
                 workdir: Optional[str] = None) -> ImageCaptionDataset:
    """The run's data. A ControlNet run's batches also hold each image's control image; one that
    writes its own data (`controlnet.shapes_data`, the shapes world) writes it into
    `<workdir>/data` first."""
    d = config.data
    kwargs = dict(batch_size=d.batch_size, resolution=d.resolution, crop=d.crop,
                  random_flip=d.random_flip, use_latents=d.use_latents, seed=config.seed,
                  shuffle=d.shuffle, process_index=jax.process_index(),
                  process_count=jax.process_count(), prefetch=d.prefetch,
                  num_workers=d.num_workers, tokenizer=tokenizer)
    if d.get("caption_transform"):
        kwargs["caption_transform"] = import_function(d.caption_transform)
    folder, manifest = d.folder, d.manifest
    if d.conditioning_dir and not config.controlnet.use:
        raise ValueError("data.conditioning_dir is set, but conditioning images are read for a "
                         "ControlNet run (controlnet.use) only")
    if config.controlnet.use:
        settings = controlnet_lib.controlnet_settings(config.controlnet.to_dict(),
                                                      exclude=CONTROLNET_RUN_FIELDS)
        kwargs.update(conditioning=True, conditioning_dir=d.conditioning_dir or None)
        if settings.shapes_control:
            if folder or manifest or d.conditioning_dir or workdir is None:
                raise ValueError("controlnet.shapes_control writes the run's own data into its "
                                 "workdir: leave data.folder, data.manifest and "
                                 "data.conditioning_dir empty")
            made = import_function(settings.shapes_data)(
                os.path.join(workdir, "data"), settings.shapes_examples, seed=config.seed,
                image_size=d.resolution, control=settings.shapes_control,
                drop_position=settings.drop_position, write=jax.process_index() == 0)
            _sync("controlnet data")
            folder = made["folder"]
            kwargs.update(conditioning_dir=made["conditioning_dir"],
                          caption_transform=made["caption_transform"])
    if folder:
        return ImageCaptionDataset.from_folder(folder, **kwargs)
    if manifest:
        return ImageCaptionDataset.from_manifest(manifest, **kwargs)
    raise ValueError("set config.data.folder (images with .txt captions) or config.data.manifest")


def _sync(name: str) -> None:
    """Every process waits here for the others (process 0 wrote something they read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _to_host(tree):
    """Global arrays -> numpy on every process (gathered across hosts when needed)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def export_params(state: TrainState, use_ema: bool) -> dict:
    """The params a sampler should use: the EMA of each trainable model when kept, else current."""
    params = dict(state.params)
    if use_ema and state.ema_params is not None:
        params.update(state.ema_params)
    return params


def export(setup: Setup, state: TrainState, path: str, use_ema: bool = True) -> Optional[str]:
    """Write a native folder of the model with the trained params: `save_pretrained` for the
    latent-diffusion objectives, `save_clip_native` for CLIP (what `load_clip_scorer` and
    `--clip_model` read); for a LoRA run, the LoRA alone (`lora.export_files`: kohya's file and
    sdjax's, with kohya's `ss_*` metadata); for a textual-inversion run, the token's vectors
    (`textual_inversion.export_files`: the WebUI's file and diffusers'); for a ControlNet run,
    the ControlNet as a diffusers folder `<path>/controlnet` (`controlnet.export_files`; with
    the model beside it when a text encoder trained too)."""
    params = export_params(state, use_ema)
    if setup.adapter is not None:
        params = {group: params[group] for group in setup.adapter.groups}
    if setup.controlnet is not None:
        params = {name: params[name] for name in state.optimizer.trainable}
    params = _to_host(params)
    if jax.process_index() == 0:
        if setup.network is not None:
            metadata = {} if setup.task.prediction_type == "flow" else lora.kohya_metadata(
                setup.network, family=setup.model.family,
                prediction_type=setup.task.prediction_type, groups=state.optimizer.groups,
                extra={**setup.run_metadata, "ss_steps": int(optimizer_steps(state)),
                       "ss_training_finished_at": time.time()})
            lora.export_files(setup.network, params, setup.model, path, setup.lora_name, metadata)
        elif setup.inversion is not None:
            textual_inversion.export_files(setup.inversion, params, path,
                                           {"step": int(optimizer_steps(state))})
        elif setup.controlnet is not None:
            controlnet_lib.export_files(setup.controlnet, params, setup.model, path,
                                        source=f"{path} (step {int(optimizer_steps(state))})")
        elif setup.model is None:
            save_clip_native(path, setup.task.config, params["clip"], CLIPTokenizer.default())
        else:
            model = dataclasses.replace(setup.model, params={**setup.model.params, **params},
                                        source=path)
            save_pretrained(model, path)
        logging.info("exported %s", path)
    _sync(f"export {path}")
    return path


class _Preemption:
    """SIGTERM sets a flag; the loop finishes its step, checkpoints and returns."""

    def __init__(self):
        self.requested = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (every process must stop at the same step)."""
        flag = self.requested.is_set()
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils
        return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class _Sampler:
    """Sample grids from the current or EMA params, with one Generator (compiled once)."""

    def __init__(self, setup: Setup, config, mesh, workdir: str):
        from sdjax.sampling.generator import Generator
        from sdjax.sampling.requests import Request
        from sdjax.sampling.spec import SamplingSpec

        self.config = config.sample
        self.adapter = setup.adapter
        self.generator = Generator(setup.model, mesh=mesh)
        self.request = Request(prompt=list(self.config.prompts),
                               num_images=len(self.config.prompts), seed=self.config.seed,
                               cfg_scale=self.config.cfg_scale)
        r = config.data.resolution
        # A flow model's grids see captions of the T5 length it trains on.
        length = (flow_lib.sequence_length(setup.model.family,
                                           flow_settings(config).get("max_sequence_length", 0))
                  if config.objective == "flow" else 0)
        self.spec = SamplingSpec(sampler=self.config.sampler, steps=self.config.steps, height=r,
                                 width=r, max_sequence_length=length)
        self.dir = os.path.join(workdir, "samples")

    def __call__(self, state: TrainState, step: int) -> str:
        params = export_params(state, self.config.use_ema)
        if self.adapter is not None:
            params = self.adapter.inference_params(params)
        self.generator.params = params
        out = self.generator(self.request, self.spec, check_finite=False)
        self.generator.params = None  # the state's buffers are donated by the next step
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"step_{step:07d}.png")
        images_lib.save_png(images_lib.grid(list(images_lib.to_uint8(out["images"]))), path)
        return path


def _write_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Train as `config` says, checkpointing into `workdir/checkpoints` and resuming from its
    latest checkpoint. Returns {"step", "stopped" ("done" | "preempted"), "metrics" (last step's),
    "examples_per_sec", "steps_per_sec", "nonfinite_steps", "export"}.

    Raises TrainingDiverged after `max_consecutive_nonfinite` non-finite steps in a row (having
    checkpointed the last good state)."""
    main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if main:
        _write_config(config, workdir)
    setup = build(config)
    mesh = parallel.make_mesh(fsdp=config.fsdp)
    parallel.check_batch_divides(config.data.batch_size, mesh, "data.batch_size")
    shardings = step_lib.state_sharding(mesh, setup.state)
    state = step_lib.place(setup.state, shardings, consume=True)
    setup.state = None
    dataset = make_dataset(config, setup.tokenizer, workdir)
    if setup.network is not None:
        setup.run_metadata.update(ss_num_train_images=len(dataset.records),
                                  ss_num_batches_per_epoch=dataset.batches_per_epoch)
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), save_every=config.checkpoint.every,
                       keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    step, nonfinite_total = 0, 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        dataset.load_state_dict(meta["data"])
        step, nonfinite_total = int(meta["step"]), int(meta["nonfinite_steps"])
        logging.info("resumed from %s/%d", ckpt.directory, step)

    def meta():
        return {"step": step, "data": dataset.state_dict(), "nonfinite_steps": nonfinite_total}

    train_fn = step_lib.make_train_step(setup.task, mesh, shardings)
    key_fn = jax.jit(jax.random.fold_in, out_shardings=parallel.replicated(mesh))
    sampler = None
    if config.sample.every and setup.model is not None and config.objective in ("ldm", "flow"):
        if setup.controlnet is not None:
            # The grids' requests would need control images; the export is what to sample.
            logging.warning("sample grids are not drawn in ControlNet runs")
        elif jax.process_count() == 1:
            sampler = _Sampler(setup, config, mesh, workdir)
        else:
            logging.warning("sample grids are written in single-process runs only")
    metrics_file = MetricsWriter(workdir, resumed_step=step) if main else None
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.total_steps, initial=step, desc="train", unit="step")

    consecutive, saved = 0, step
    last: dict = {}
    stopped = "done"
    window_start, window_steps = time.perf_counter(), 0
    rates = {"steps_per_sec": 0.0, "examples_per_sec": 0.0}
    try:
        with _Preemption() as preemption:
            while step < config.total_steps:
                local = next(dataset)
                if setup.hard_negative_captions is not None:
                    local["negative_input_ids"] = hard_negative_ids(
                        local["captions"], setup.tokenizer, setup.hard_negative_captions,
                        config.clip.hard_negatives,
                        np.random.default_rng([config.seed, jax.process_index(), step]))
                batch = step_lib.device_batch(local, mesh)
                key = key_fn(state.rng, step)
                state, metrics = train_fn(state, batch, key)
                step += 1
                window_steps += 1
                # Reading the metrics waits for this step only; the next batch is already
                # being prefetched by the dataset's thread.
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if last["finite"]:
                    consecutive = 0
                else:
                    consecutive += 1
                    nonfinite_total += 1
                    logging.warning("step %d: non-finite loss or gradients (loss %s, grad norm %s);"
                                    " update skipped (%d in a row)", step, last["loss"],
                                    last["grad_norm"], consecutive)
                if consecutive >= config.max_consecutive_nonfinite:
                    ckpt.save(step, state, meta(), force=True)
                    saved = step
                    ckpt.wait()
                    raise TrainingDiverged(
                        f"{consecutive} consecutive non-finite steps (up to step {step}); the last "
                        f"good state is checkpointed at {ckpt.directory}/{step}. Lower the learning "
                        f"rate, clip gradients or use float32 compute.")
                if bar is not None:
                    bar.update(1)
                if step % config.log_every == 0 or step == config.total_steps:
                    elapsed = time.perf_counter() - window_start
                    rates = {"steps_per_sec": window_steps / elapsed,
                             "examples_per_sec": window_steps * config.data.batch_size / elapsed}
                    window_start, window_steps = time.perf_counter(), 0
                    if main:
                        record = {"step": step, **last, **rates, "nonfinite_steps": nonfinite_total}
                        metrics_file.write(step, record)
                        logging.info("step %d: %s", step, ", ".join(
                            f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
                if ckpt.save(step, state, meta()):
                    saved = step
                if sampler is not None and step % config.sample.every == 0:
                    logging.info("samples: %s", sampler(state, step))
                if (config.checkpoint.export_every and step % config.checkpoint.export_every == 0
                        and step < config.total_steps):
                    export(setup, state, os.path.join(workdir, "exports", f"step_{step:07d}"))
                if preemption.agreed():
                    stopped = "preempted"
                    logging.info("SIGTERM: saving step %d and stopping", step)
                    break
        if saved != step:
            ckpt.save(step, state, meta(), force=True)
        ckpt.wait()
        exported = None
        if stopped == "done":
            if sampler is not None and step % config.sample.every:
                logging.info("samples: %s", sampler(state, step))
            exported = export(setup, state, os.path.join(workdir, "export"))
    finally:
        ckpt.wait()
        ckpt.close()
        dataset.close()
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return {"step": step, "stopped": stopped, "metrics": last, **rates,
            "nonfinite_steps": nonfinite_total, "export": exported, "state": state}


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                      step: Optional[int] = None) -> str:
    """Export checkpoint `step` (None: the newest) of the run `config` trains in `workdir` into
    `workdir/exports/step_<N>`, as the run itself exports (a LoRA run: its LoRA files; a
    textual-inversion run: its token's files; a ControlNet run: its `controlnet/` folder)."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no checkpoints to export")
    setup = build(config)
    mesh = parallel.make_mesh(fsdp=config.fsdp)
    shardings = step_lib.state_sharding(mesh, setup.state)
    state = step_lib.place(setup.state, shardings, consume=True)
    setup.state = None
    ckpt = Checkpoints(folder, async_save=False)
    try:
        state, meta = ckpt.restore(state, step)
    finally:
        ckpt.close()
    return export(setup, state, os.path.join(workdir, "exports", f"step_{int(meta['step']):07d}"))
