"""Peak memory (RSS) while loading a full-size checkpoint, and while loading it and sampling one
image: sdjax vs the PyTorch reference.

    python -m benchmarks.load_memory                 # SD 1.5, random weights, diffusers folder
    python -m benchmarks.load_memory --preset=tiny   # seconds; what CI runs

Each loader runs in a fresh process; the figure is that process's peak RSS (VmHWM, which unlike
ru_maxrss is not inherited from the parent across exec) after subtracting its RSS once the libraries
are imported, compared with the float32 size of the params. The sampling rows load, then draw one
guided image (sdjax `Generator` / diffusers `StableDiffusionPipeline`, DPM-Solver++(2M)).
Target (sdjax, loading): peak above baseline <= 1.3x the float32 params.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_string("preset", "sd15", "architecture preset (sdjax.weights.presets: sd15, sd21, sdxl, tiny)")
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "sdjax-bench"),
                    "where the random checkpoint is written (reused between runs)")
flags.DEFINE_bool("reference", True, "also measure diffusers/transformers (PyTorch)")
flags.DEFINE_integer("sample_size", 0, "image size of the sampling rows (default: 512; tiny: 32)")
flags.DEFINE_integer("steps", 2, "denoising steps of the sampling rows (memory does not grow "
                     "with steps: the loop carries one latent)")
FLAGS = flags.FLAGS

_STATUS = """
import os
PROMPT = "a photograph of an astronaut riding a horse"
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
"""

_SDJAX_LOADER = _STATUS + """
import json, sys
import numpy as np, jax
import sdjax
base = status_kib("VmRSS")
model = sdjax.load_pretrained(sys.argv[1])
n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
if len(sys.argv) > 2:
    from sdjax.sampling import Generator, Request, SamplingSpec
    size, steps = int(sys.argv[2]), int(sys.argv[3])
    generator = Generator(model)
    del model
    np.asarray(generator(Request(prompt=PROMPT, seed=0, cfg_scale=7.5),
                         SamplingSpec(sampler="dpmpp_2m", steps=steps, height=size, width=size,
                                      progress=False)))
peak = status_kib("VmHWM")
print(json.dumps({"base_kib": base, "peak_kib": peak, "params": n}))
"""

_REFERENCE_LOADER = _STATUS + """
import json, sys
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
base = status_kib("VmRSS")
parts = [UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet"),
         AutoencoderKL.from_pretrained(sys.argv[1], subfolder="vae"),
         CLIPTextModel.from_pretrained(sys.argv[1], subfolder="text_encoder")]
n = sum(p.numel() for m in parts for p in m.parameters())
if len(sys.argv) > 2:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    size, steps = int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    pipe = StableDiffusionPipeline.from_pretrained(
        sys.argv[1], unet=parts[0], vae=parts[1], text_encoder=parts[2], safety_checker=None,
        requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
             generator=torch.Generator().manual_seed(0), output_type="np")
peak = status_kib("VmHWM")
print(json.dumps({"base_kib": base, "peak_kib": peak, "params": n}))
"""


def measure(script: str, path: str, *sample_args: str) -> dict:
    """Run one loader script in a fresh process (sampling too when given size and steps)."""
    out = subprocess.run([sys.executable, "-c", script, path, *sample_args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {path} {' '.join(sample_args)} failed "
                           f"(code {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(_):
    from benchmarks import timing
    from benchmarks.checkpoints import write_diffusers_folder

    path = str(write_diffusers_folder(FLAGS.preset, os.path.join(FLAGS.workdir, FLAGS.preset)))
    size = FLAGS.sample_size or (32 if FLAGS.preset == "tiny" else 512)
    loaders = [("sdjax", _SDJAX_LOADER)]
    if FLAGS.reference:
        loaders.append(("diffusers (PyTorch)", _REFERENCE_LOADER))
    rows = []
    for what, args in [("load", []), (f"load + sample {size} px", [str(size), str(FLAGS.steps)])]:
        for name, script in loaders:
            r = measure(script, path, *args)
            fp32 = r["params"] * 4 / 2**20
            base, peak = r["base_kib"] / 1024, r["peak_kib"] / 1024
            rows.append([name, what, r["params"] / 1e6, fp32, base, peak, peak - base,
                         (peak - base) / fp32])
    print(f"peak RSS, preset {FLAGS.preset} from {path}; sampling: one image with guidance, "
          f"{FLAGS.steps} steps dpmpp_2m, float32")
    print(timing.table(["implementation", "work", "params (M)", "fp32 MiB", "base MiB",
                        "peak MiB", "peak − base MiB", "(peak − base) / fp32 params"], rows))


if __name__ == "__main__":
    app.run(main)
