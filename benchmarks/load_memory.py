"""Peak memory (RSS) while loading a full-size checkpoint: sdjax vs the PyTorch reference.

    python -m benchmarks.load_memory                 # SD 1.5, random weights, diffusers folder
    python -m benchmarks.load_memory --preset=tiny   # seconds; what CI runs

Each loader runs in a fresh process; the figure is that process's peak RSS (VmHWM, which unlike
ru_maxrss is not inherited from the parent across exec) after subtracting its RSS once the libraries
are imported, compared with the float32 size of the params.
Target (sdjax): peak above baseline <= 1.3x the float32 params.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_string("preset", "sd15", "architecture preset (sdjax.presets: sd15, sd21, sdxl, tiny)")
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "sdjax-bench"),
                    "where the random checkpoint is written (reused between runs)")
flags.DEFINE_bool("reference", True, "also measure diffusers/transformers (PyTorch) loading")
FLAGS = flags.FLAGS

_STATUS = """
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
peak = status_kib("VmHWM")
n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
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
peak = status_kib("VmHWM")
n = sum(p.numel() for m in parts for p in m.parameters())
print(json.dumps({"base_kib": base, "peak_kib": peak, "params": n}))
"""


def measure(script: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, path], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(_):
    from benchmarks.checkpoints import write_diffusers_folder

    path = write_diffusers_folder(FLAGS.preset, os.path.join(FLAGS.workdir, FLAGS.preset))
    rows = [("sdjax", measure(_SDJAX_LOADER, str(path)))]
    if FLAGS.reference:
        rows.append(("diffusers (PyTorch)", measure(_REFERENCE_LOADER, str(path))))
    print(f"loading {FLAGS.preset} from {path}")
    print(f"{'loader':<22}{'params (M)':>11}{'fp32 MiB':>10}{'base MiB':>10}{'peak MiB':>10}"
          f"{'peak-base MiB':>15}{'(peak-base)/fp32':>18}")
    for name, r in rows:
        fp32 = r["params"] * 4 / 2**20
        base, peak = r["base_kib"] / 1024, r["peak_kib"] / 1024
        print(f"{name:<22}{r['params'] / 1e6:>11.1f}{fp32:>10.0f}{base:>10.0f}{peak:>10.0f}"
              f"{peak - base:>15.0f}{(peak - base) / fp32:>18.2f}")


if __name__ == "__main__":
    app.run(main)
