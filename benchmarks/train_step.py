"""Training step throughput (examples/s): sdjax's jitted `train_step` vs the diffusers PyTorch
training step (as its train_text_to_image.py example does it) with the same weights, batch and
settings, in one run.

    python -m benchmarks.train_step                   # SD 1.5 at 32² latents (256 px), batch 1
    python -m benchmarks.train_step --preset=tiny     # configs/train_tiny.py; seconds; what CI runs

One step on both sides: VAE-encode the pixels (frozen) and sample the posterior, noise at uniform
timesteps, caption dropout, CLIP text encoder (trained or frozen as the config says), U-Net,
epsilon MSE (min-SNR weighted where the config says), backward, global-norm clipping, AdamW with a learning rate per model, EMA of the
trained models when the config keeps one. Settings come from one config for both sides
(`benchmark_config`): the tiny preset runs configs/train_tiny.py as it is (U-Net and text encoder
trained at their own rates, EMA); SD 1.5 runs configs/train_sd15.py (U-Net trained, text encoder and
VAE frozen) in float32 without remat or EMA at batch 1, which fits both sides in this machine's
memory one after the other.

Each side runs in a worker process of its own (`timing.StepWorker`), stepped one timed step at a
time: together and interleaved where both fit in memory (`--together`, the default for tiny), else
one after the other (SD 1.5: ~15 GB each). Compilation (sdjax) and the first step's warm-up
(PyTorch) are excluded and reported as "setup s" with the loading.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import timing

flags.DEFINE_string("preset", "sd15", "architecture preset: sd15 or tiny")
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "sdjax-bench"),
                    "where the random checkpoint is written (reused between runs)")
flags.DEFINE_integer("repeats", 5, "timed steps of each implementation (median reported)")
flags.DEFINE_bool("reference", True, "also time the diffusers (PyTorch) training step")
flags.DEFINE_bool("together", None, "run both workers at once, steps interleaved (default: "
                  "only for tiny; SD 1.5's two training states do not fit in 24 GiB together)")
flags.DEFINE_enum("worker", None, ["sdjax", "diffusers"], "internal: be this side's worker")
flags.DEFINE_string("folder", "", "internal: the diffusers folder a worker loads")
FLAGS = flags.FLAGS

CAPTION = "a photograph of an astronaut riding a horse"


def benchmark_config(preset_name: str, lora: bool = False):
    """The training config both sides follow (see the module docstring); `lora`: the preset's LoRA
    run (configs/train_lora_tiny.py, train_lora_sd15.py) at the same settings (benchmarks/lora.py)."""
    if preset_name == "tiny":
        from configs import train_lora_tiny, train_tiny
        return (train_lora_tiny if lora else train_tiny).get_config()
    if preset_name != "sd15":
        raise ValueError(f"--preset={preset_name}: the training benchmark knows tiny and sd15")
    from configs import train_lora_sd15, train_sd15
    config = (train_lora_sd15 if lora else train_sd15).get_config()
    with config.unlocked():
        config.compute_dtype = "float32"
        config.remat = False
        config.ema.use = False
        config.data.resolution = 256
        config.data.batch_size = 1
    return config


def example_batch(config):
    """(pixels (B, H, W, 3) in [-1, 1], captions): the same fixed batch for both sides."""
    import numpy as np

    b, s = config.data.batch_size, config.data.resolution
    pixels = np.random.default_rng(0).uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
    return pixels, [CAPTION] * b


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim; nothing elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sdjax_worker(folder: str, config) -> None:
    import jax

    from sdjax import parallel
    from sdjax.training import loop
    from sdjax.training import step as step_lib

    start = time.perf_counter()
    with config.unlocked():
        config.init_from = folder
    setup = loop.build(config)
    mesh = parallel.make_mesh(fsdp=config.fsdp)
    shardings = step_lib.state_sharding(mesh, setup.state)
    state = step_lib.place(setup.state, shardings, consume=True)
    task, tokenizer = setup.task, setup.tokenizer
    del setup  # the host copy of the params and optimizer state
    pixels, captions = example_batch(config)
    batch = step_lib.device_batch({"pixels": pixels, "input_ids": tokenizer(captions)}, mesh)
    run_key = jax.random.key(config.seed)
    train_fn = step_lib.make_train_step(task, mesh, shardings).lower(
        state, batch, jax.random.fold_in(run_key, 0)).compile()
    # The compiler's heap is free now but still resident; SD 1.5's first step needs that room.
    release_free_heap()
    calls = 0

    def step():
        nonlocal state, calls
        state, metrics = train_fn(state, batch, jax.random.fold_in(run_key, calls))
        calls += 1
        jax.block_until_ready((state, metrics))
        return metrics

    metrics = step()
    print(f"first_loss {float(metrics['loss']):.6g}", flush=True)
    timing.serve_runs(step, time.perf_counter() - start)


def diffusers_worker(folder: str, config, lora_targets: dict | None = None) -> None:
    """The reference step. With `lora_targets` ({optimizer group: {"model", "modules" (reference
    names), "rank", "alpha"}}) the models stay frozen and peft LoRAs on those modules are trained,
    as diffusers' train_text_to_image_lora.py does (Gaussian init, AdamW on the LoRA params only)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    torch.set_num_threads(timing.num_cores())
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    models = {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    groups = config.optimizer.groups.to_dict()
    if lora_targets:
        from benchmarks import peft_lora

        for model in models.values():
            model.requires_grad_(False)
        trained = {t["model"]: models[t["model"]] for t in lora_targets.values()}
        group_params = {group: peft_lora.trainable_parameters(peft_lora.inject(
            models[t["model"]], t["modules"], t["rank"], t["alpha"], init="gaussian"))
            for group, t in lora_targets.items()}
    else:
        trained = {name: models[name] for name, g in groups.items() if not g.get("frozen", False)}
        group_params = {name: list(model.parameters()) for name, model in trained.items()}
        for name, model in models.items():
            model.requires_grad_(name in trained)
    for name, model in models.items():
        model.train(name in trained)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": groups[name]["lr"],
          "weight_decay": groups[name].get("weight_decay", 0.0)}
         for name, params in group_params.items()],
        betas=(0.9, 0.999), eps=1e-8)
    trainable = [p for params in group_params.values() for p in params]
    emas = ([EMAModel(params, decay=config.ema.decay) for params in group_params.values()]
            if config.ema.use else [])

    pixels, captions = example_batch(config)
    pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

    def ids_of(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    input_ids, empty_ids = ids_of(captions), ids_of([""])
    scaling = vae.config.scaling_factor
    prediction_type = config.ldm.prediction_type or noise_scheduler.config.prediction_type
    b = pixels.shape[0]

    def step():
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * scaling
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        dropped = torch.rand(b) < config.ldm.caption_dropout
        ids = torch.where(dropped[:, None], empty_ids, input_ids)
        with torch.set_grad_enabled("text_encoder" in trained):
            context = text_encoder(ids, return_dict=False)[0]
        target = (noise if prediction_type == "epsilon"
                  else noise_scheduler.get_velocity(latents, noise, timesteps))
        prediction = unet(noisy, timesteps, context, return_dict=False)[0]
        if config.ldm.snr_gamma:  # min-SNR-gamma weighting, as train_text_to_image.py does it
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=config.ldm.snr_gamma) / (
                snr if prediction_type == "epsilon" else snr + 1)
            loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
            loss = (loss.mean(dim=(1, 2, 3)) * weights).mean()
        else:
            loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        if config.optimizer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for ema, params in zip(emas, group_params.values()):
            ema.step(params)
        return loss.detach()

    loss = step()  # allocates the optimizer state
    print(f"first_loss {loss.item():.6g}", flush=True)
    timing.serve_runs(step, time.perf_counter() - start)


def main(_):
    config = benchmark_config(FLAGS.preset)
    if FLAGS.worker:
        worker = sdjax_worker if FLAGS.worker == "sdjax" else diffusers_worker
        return worker(FLAGS.folder, config)

    from benchmarks.checkpoints import write_diffusers_folder

    folder = str(write_diffusers_folder(FLAGS.preset, os.path.join(FLAGS.workdir, FLAGS.preset)))
    sides = {"sdjax": "sdjax"}
    if FLAGS.reference:
        sides["diffusers (PyTorch)"] = "diffusers"
    together = FLAGS.preset == "tiny" if FLAGS.together is None else FLAGS.together

    def start(side):
        return timing.StepWorker(sys.executable, "benchmarks.train_step", f"--worker={side}",
                                 f"--preset={FLAGS.preset}", f"--folder={folder}")

    times, workers = {}, {}
    if together:
        workers = {name: start(side) for name, side in sides.items()}
        times = timing.interleaved({name: w.run for name, w in workers.items()}, FLAGS.repeats)
        for w in workers.values():
            w.close()
    else:
        for name, side in sides.items():
            workers[name] = start(side)
            times.update(timing.interleaved({name: workers[name].run}, FLAGS.repeats))
            workers[name].close()

    batch = config.data.batch_size
    ours = timing.median(times["sdjax"])
    rows = []
    for name, values in times.items():
        t_med = timing.median(values)
        w = workers[name]
        rows.append([name, t_med, min(values), batch / t_med,
                     ours / t_med if name != "sdjax" else None, w.setup_s,
                     float(w.info["peak_rss_mib"]), float(w.info["first_loss"])])
    trained = [n for n, g in config.optimizer.groups.to_dict().items() if not g.get("frozen")]
    print(f"training step, preset {FLAGS.preset}, batch {batch}, {config.data.resolution} px, "
          f"{config.compute_dtype}, trained {'+'.join(trained)}, EMA "
          f"{'on' if config.ema.use else 'off'}, {timing.num_cores()} cores, "
          f"{'interleaved' if together else 'one worker after the other'}, median of "
          f"{FLAGS.repeats}")
    print(timing.table(["implementation", "median s / step", "min s", "examples / s",
                        "sdjax / this (time)", "setup s (load + first step)", "peak RSS MiB",
                        "first loss"], rows))


if __name__ == "__main__":
    app.run(main)
