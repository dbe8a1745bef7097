"""U-Net forward time: sdjax (jitted, compile excluded) vs diffusers PyTorch with the same weights and
inputs, and diffusers 0.39 Flax when its venv exists, all timed in turn in one run.

    python -m benchmarks.unet_forward                  # SD 1.5, batch 2, latents 32² and 64², fp32 + bf16
    python -m benchmarks.unet_forward --preset=tiny    # seconds; what CI runs

Also printed: sdjax's achieved GFLOP/s (FLOPs from XLA's cost analysis of the forward) and
its fraction of a jitted n x n float32 matmul timed in turn with the forwards, and the largest difference
between sdjax's and PyTorch's outputs (a check that both ran the same network).
Targets: 32² <= 0.8x PyTorch and <= 0.75x diffusers-Flax; 64² <= 0.95x PyTorch and <= 0.6x
diffusers-Flax; >= 75% of the matmul ceiling at both (float32).
"""
from __future__ import annotations

import dataclasses
import sys
import time

from absl import app, flags

from benchmarks import timing

flags.DEFINE_string("preset", "sd15", "architecture preset (sdjax.weights.presets)")
flags.DEFINE_list("sizes", [], "latent sizes (default: 32,64; tiny: 8,16)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute/param dtypes")
flags.DEFINE_integer("batch", 2, "batch size (2: one image with guidance)")
flags.DEFINE_integer("repeats", 3, "timed runs of each implementation (median reported)")
flags.DEFINE_integer("matmul", 0, "matmul ceiling size n (default: 4096; tiny: 256)")
flags.DEFINE_bool("reference", True, "also time diffusers' PyTorch U-Net")
flags.DEFINE_string("flax_venv", timing.FLAX_VENV, "venv with diffusers 0.39 "
                    "(benchmarks/setup_references.sh); skipped if absent or ''")
FLAGS = flags.FLAGS

CONTEXT_LENGTH = 77


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from sdjax.models.unet import UNet, UNetConfig
    from sdjax.weights.presets import preset
    from sdjax.weights.common import DictSource
    from sdjax.weights.unet import unet_params

    tiny = FLAGS.preset == "tiny"
    sizes = [int(s) for s in FLAGS.sizes] or ([8, 16] if tiny else [32, 64])
    cores = timing.num_cores()
    torch.set_num_threads(cores)
    flax_py = timing.flax_python(FLAGS.flax_venv)

    matmul_n = FLAGS.matmul or (256 if tiny else 4096)
    run_matmul, matmul_flops = timing.matmul_run(matmul_n)
    config_dict = preset(FLAGS.preset)["unet"]
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**config_dict).eval()
    config = UNetConfig.from_diffusers(dict(reference.config))
    params32 = unet_params(DictSource({k: v.numpy() for k, v in reference.state_dict().items()}),
                           config)
    if not FLAGS.reference:
        del reference

    rows = []
    for dtype_name in FLAGS.dtypes:
        dtype = jnp.dtype(dtype_name)
        params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), params32))
        torch_dtype = getattr(torch, dtype_name)
        if FLAGS.reference:
            reference.to(torch_dtype)
        model = UNet(config, dtype=dtype, param_dtype=dtype)
        forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
        unblocked = UNet(dataclasses.replace(config, attention="reference"), dtype=dtype,
                         param_dtype=dtype)
        flops_forward = jax.jit(lambda p, x, t, c: unblocked.apply({"params": p}, x, t, c))
        for size in sizes:
            rng = np.random.default_rng(size)
            latents = rng.standard_normal((FLAGS.batch, size, size, config.in_channels), np.float32)
            context = rng.standard_normal((FLAGS.batch, CONTEXT_LENGTH, config.cross_attention_dim),
                                          np.float32)
            t = np.full((FLAGS.batch,), 500.0, np.float32)
            x_j, c_j, t_j = (jnp.asarray(latents, dtype), jnp.asarray(context, dtype),
                             jnp.asarray(t))
            start = time.perf_counter()
            compiled = forward.lower(params, x_j, t_j, c_j).compile()
            compile_s = time.perf_counter() - start
            # The blocked CPU attention loops over blocks, which XLA's cost analysis counts once:
            # count the same maths with whole-matrix attention instead.
            flops = timing.xla_flops(flops_forward.lower(params, x_j, t_j, c_j))
            out = compiled(params, x_j, t_j, c_j)
            runs = {"sdjax": lambda: compiled(params, x_j, t_j, c_j).block_until_ready(),
                    "matmul": run_matmul}
            diff = None
            if FLAGS.reference:
                x_t = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(torch_dtype)
                c_t = torch.from_numpy(context).to(torch_dtype)
                t_t = torch.from_numpy(t)

                def run_torch():
                    with torch.inference_mode():
                        return reference(x_t, t_t, c_t).sample

                expected = run_torch().float().numpy().transpose(0, 2, 3, 1)
                diff = float(np.max(np.abs(np.asarray(out, np.float32) - expected)))
                runs["diffusers (PyTorch)"] = run_torch
            flax_ref = None
            if flax_py:
                # Its own venv, stepped one run at a time in turn with ours.
                flax_ref = timing.StepWorker(flax_py, "benchmarks.flax_reference",
                                             f"--preset={FLAGS.preset}", f"--size={size}",
                                             f"--batch={FLAGS.batch}", f"--dtype={dtype_name}")
                runs["diffusers 0.39 (Flax)"] = flax_ref.run
            times = timing.interleaved(runs, FLAGS.repeats)
            if flax_ref is not None:
                flax_ref.close()
            ceiling = matmul_flops / timing.median(times.pop("matmul")) / 1e9
            ours = timing.median(times["sdjax"])
            gflops = flops / ours / 1e9
            for name, values in times.items():
                t_med = timing.median(values)
                rows.append([f"{size}x{size}", dtype_name, name, t_med, min(values),
                             ours / t_med if name != "sdjax" else None,
                             gflops if name == "sdjax" else None,
                             ceiling if name == "sdjax" else None,
                             gflops / ceiling if name == "sdjax" else None,
                             compile_s if name == "sdjax" else (
                                 flax_ref.setup_s if flax_ref and "Flax" in name else None),
                             diff if "PyTorch" in name else None])
            print(f"done {size}x{size} {dtype_name}", file=sys.stderr, flush=True)

    print(f"U-Net forward, preset {FLAGS.preset}, batch {FLAGS.batch}, {cores} cores "
          f"(torch threads {torch.get_num_threads()}), jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, median of {FLAGS.repeats}")
    print(f"matmul ceiling: a jitted {matmul_n}² float32 matmul, timed in turn with the others")
    if not flax_py:
        print(f"diffusers 0.39 (Flax): not run (no venv at {FLAGS.flax_venv!r}; "
              f"benchmarks/setup_references.sh makes it)")
    print(timing.table(["latents", "dtype", "implementation", "median s", "min s",
                        "sdjax / this", "GFLOP/s", "ceiling GFLOP/s", "of ceiling", "compile s",
                        "max |Δ| vs sdjax"],
                       rows))


if __name__ == "__main__":
    app.run(main)
