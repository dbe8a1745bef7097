"""End-to-end txt2img wall time: sdjax `Generator` vs diffusers' `StableDiffusionPipeline` (PyTorch)
on the same random-weight diffusers folder, timed in turn in one run, compilation excluded.

    python -m benchmarks.txt2img                  # SD 1.5, 20 steps, 256 px, one image with guidance
    python -m benchmarks.txt2img --preset=tiny    # seconds; what CI runs

Both sides use DPM-Solver++(2M) (one U-Net call on the [uncond; cond] batch per step), so the work
is the same: text encoding, 20 guided U-Net steps, VAE decode. Target: sdjax <= 0.8x PyTorch.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import timing

flags.DEFINE_string("preset", "sd15", "architecture preset (sdjax.weights.presets)")
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "sdjax-bench"),
                    "where the random checkpoint is written (reused between runs)")
flags.DEFINE_integer("steps", 20, "denoising steps")
flags.DEFINE_integer("size", 0, "image height and width in pixels (default: 256; tiny: 32)")
flags.DEFINE_integer("repeats", 3, "timed runs of each implementation (median reported)")
flags.DEFINE_bool("reference", True, "also time diffusers' StableDiffusionPipeline (PyTorch)")
flags.DEFINE_bool("warmup", True, "run the reference once untimed first (sdjax's first call "
                  "compiles and is never timed)")
FLAGS = flags.FLAGS

PROMPT = "a photograph of an astronaut riding a horse"


def main(_):
    import jax
    import numpy as np

    import sdjax
    from benchmarks.checkpoints import write_diffusers_folder
    from sdjax.sampling import Generator, Request, SamplingSpec

    size = FLAGS.size or (32 if FLAGS.preset == "tiny" else 256)
    path = write_diffusers_folder(FLAGS.preset, os.path.join(FLAGS.workdir, FLAGS.preset))
    cores = timing.num_cores()

    generator = Generator(sdjax.load_pretrained(path))
    spec = SamplingSpec(sampler="dpmpp_2m", steps=FLAGS.steps, height=size, width=size)
    request = Request(prompt=PROMPT, seed=0, cfg_scale=7.5)
    start = time.perf_counter()
    generator(request, spec)
    first_s = time.perf_counter() - start
    runs = {"sdjax Generator": lambda: generator(request, spec)}

    if FLAGS.reference:
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        torch.set_num_threads(cores)
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def run_reference():
            with torch.inference_mode():
                return pipe(PROMPT, num_inference_steps=FLAGS.steps, height=size, width=size,
                            guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                            output_type="np").images

        if FLAGS.warmup:
            run_reference()
        runs["diffusers StableDiffusionPipeline (PyTorch)"] = run_reference

    times = timing.interleaved(runs, FLAGS.repeats)
    ours = timing.median(times["sdjax Generator"])
    rows = []
    for name, values in times.items():
        t_med = timing.median(values)
        rows.append([name, t_med, min(values), t_med / FLAGS.steps,
                     ours / t_med if name != "sdjax Generator" else None,
                     first_s if name == "sdjax Generator" else None])
    print(f"txt2img, preset {FLAGS.preset}, {size}x{size} px, {FLAGS.steps} steps dpmpp_2m, one "
          f"image with guidance (U-Net batch 2), {cores} cores, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, median of {FLAGS.repeats}", flush=True)
    print(timing.table(["implementation", "median s", "min s", "s / step", "sdjax / this",
                        "first call s (compile + run)"], rows))
    sys.stdout.flush()
    del np


if __name__ == "__main__":
    app.run(main)
