"""ControlNet speed: one guided denoising step of U-Net + ControlNet against diffusers' PyTorch with
the same weights and inputs, and the cost of sweeping a ControlNet's scale and start/end through
the `Generator`.

    python -m benchmarks.controlnet --modes=step                # SD 1.5, 32² latents (256 px), fp32
    python -m benchmarks.controlnet --modes=step --sizes=32,64  # and 64² (512 px)
    python -m benchmarks.controlnet --modes=sweep               # scale / start / end sweep, tiny model
    python -m benchmarks.controlnet --preset=tiny               # both in seconds; what CI runs

step: the preset's U-Net (random weights built in PyTorch) and its ControlNet
(`ControlNetModel.from_unet`, the default conditioning embedding (16, 32, 96, 256); the layers it
starts at zero drawn at random, or its residuals would be zero) converted for sdjax; batch 2
(uncond + cond, as `StableDiffusionControlNetPipeline` runs a guided step: the ControlNet sees
both halves and the same control image), 77-token context, float32. diffusers' per-step work is
`controlnet(...)` then `unet(..., down_block_additional_residuals=...,
mid_block_additional_residual=...)` under `torch.no_grad()`; sdjax's is `ControlNet.apply` then
`UNet.apply(..., control=...)` in one jitted function (compile excluded, reported apart). Both are
timed in turn with a jitted float32 matmul (the host's ceiling). "rel Δ" is max |sdjax - PyTorch|
over max |PyTorch|, for the U-Net's output and for the residuals (the worst of them); the line
below the table gives how far the ControlNet moves the U-Net's output (scale 1 against 0), so the
agreement means something. Target: sdjax <= 0.8x PyTorch's time.

sweep: a tiny model (the `tiny` preset's random diffusers folder, loaded by `load_pretrained`) and
a tiny ControlNet (`ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))`,
converted), one `Generator`, the same request drawn with control scales 0, 0.25, ..., 1.5 and then
several start/end windows. Scales and start/end are data: the program must be traced once
(`Generator.traces` stays 1 after the first call). Printed: each call's seconds and the traces so
far, the first call (trace + compile + run) against the median of the later calls, and how far
each image is from the scale-0 one (each setting must change the drawing).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import timing

flags.DEFINE_list("modes", ["step", "sweep"], "what to measure: step, sweep")
flags.DEFINE_enum("preset", "sd15", ["sd15", "tiny"], "step: architecture preset "
                  "(sdjax.weights.presets); the sweep always runs the tiny model")
flags.DEFINE_list("sizes", [], "step: latent sizes (default: 32; tiny: 8)")
flags.DEFINE_integer("repeats", 3, "step: timed runs of each implementation (median reported)")
flags.DEFINE_integer("matmul", 0, "step: matmul ceiling size n (default: 4096; tiny: 256)")
flags.DEFINE_bool("reference", True, "step: also time diffusers' PyTorch ControlNet + U-Net")
flags.DEFINE_integer("steps", 10, "sweep: denoising steps of each drawing")
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "sdjax-bench"),
                    "sweep: where the tiny random checkpoint is written (reused between runs)")
FLAGS = flags.FLAGS

BATCH = 2  # one guided image: [uncond; cond]
CONTEXT_LENGTH = 77
TIMESTEP = 500.0
SWEEP_IMAGE = 32  # pixels: the tiny preset's native size (16² latents)
SWEEP_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
SWEEP_WINDOWS = ((0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.0, 0.2), (0.8, 1.0))  # at scale 1
TINY_CONDITIONING = (8, 16)  # a 2x conditioning embedding, as the tiny preset's VAE downsamples
PROMPT = "a photograph of an astronaut riding a horse"


def randomise_zero_layers(controlnet, seed: int):
    """Fan-in-scaled random values in the layers a fresh `ControlNetModel` holds at zero (the
    conditioning embedding's last conv, the zero convs): at zero every residual is zero, and both
    sides agreeing would check nothing."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith("controlnet_") and not p.any():
                r = torch.randn(p.shape, generator=generator)
                p.copy_(r / np.sqrt(p[0].numel()) if p.ndim > 1 else 0.1 * r)
    return controlnet.eval()


def convert_controlnet(reference, config) -> dict:
    """sdjax params (host numpy) of a diffusers `ControlNetModel`: its state dict through the
    U-Net's renamer, checked against `ControlNet(config)`'s params."""
    from sdjax.weights.common import DictSource, convert_state_dict
    from sdjax.weights.controlnet import controlnet_shapes
    from sdjax.weights.unet import rename_key

    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    return convert_state_dict(DictSource(state), rename_key, controlnet_shapes(config),
                              what="ControlNet")


# --- step ---------------------------------------------------------------------------------------

def step_mode() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdjax.models.controlnet import ControlNet, ControlNetConfig
    from sdjax.models.unet import UNet, UNetConfig
    from sdjax.weights.common import DictSource
    from sdjax.weights.presets import preset
    from sdjax.weights.unet import unet_params

    tiny = FLAGS.preset == "tiny"
    sizes = [int(s) for s in FLAGS.sizes] or ([8] if tiny else [32])
    cores = timing.num_cores()
    torch.set_num_threads(cores)
    load_start = timing.load_average()
    matmul_n = FLAGS.matmul or (256 if tiny else 4096)
    run_matmul, matmul_flops = timing.matmul_run(matmul_n)

    torch.manual_seed(0)
    reference_unet = UNet2DConditionModel(**preset(FLAGS.preset)["unet"]).eval()
    reference_controlnet = randomise_zero_layers(ControlNetModel.from_unet(reference_unet), seed=1)
    config = UNetConfig.from_diffusers(dict(reference_unet.config))
    control_config = ControlNetConfig.from_unet(config)
    params = jax.device_put({
        "unet": unet_params(DictSource({k: v.numpy() for k, v in
                                        reference_unet.state_dict().items()}), config),
        "controlnet": convert_controlnet(reference_controlnet, control_config)})
    if not FLAGS.reference:
        del reference_unet, reference_controlnet

    def step_fn(unet_config):
        unet = UNet(unet_config)
        controlnet = ControlNet(ControlNetConfig.from_unet(unet_config))

        def step(params, x, t, context, image, scale):
            control = controlnet.apply({"params": params["controlnet"]}, x, t, context, image, scale)
            return unet.apply({"params": params["unet"]}, x, t, context, control=control), control

        return jax.jit(step)

    step = step_fn(config)
    # The blocked CPU attention loops over blocks, which XLA's cost analysis counts once: count
    # the same maths with whole-matrix attention (as benchmarks/unet_forward.py does).
    flops_step = step_fn(dataclasses.replace(config, attention="reference"))

    rows, notes = [], []
    for size in sizes:
        rng = np.random.default_rng(size)
        latents = rng.standard_normal((BATCH, size, size, config.in_channels), np.float32)
        context = rng.standard_normal((BATCH, CONTEXT_LENGTH, config.cross_attention_dim),
                                      np.float32)
        pixels = size * control_config.conditioning_factor
        image = np.repeat(rng.random((1, pixels, pixels, control_config.conditioning_channels),
                                     np.float32), BATCH, axis=0)  # the pipeline's cat([image] * 2)
        t = np.full((BATCH,), TIMESTEP, np.float32)
        inputs = (jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context), jnp.asarray(image))
        on, off = jnp.ones((BATCH,), jnp.float32), jnp.zeros((BATCH,), jnp.float32)

        start = time.perf_counter()
        compiled = step.lower(params, *inputs, on).compile()
        compile_s = time.perf_counter() - start
        flops = timing.xla_flops(flops_step.lower(params, *inputs, on))
        out, (down, mid) = jax.tree.map(np.asarray, compiled(params, *inputs, on))
        effect = timing.relative_difference(out,
                                            np.asarray(compiled(params, *inputs, off)[0]))
        notes.append(f"{size}x{size}: the ControlNet (scale 1 against 0) moves the U-Net's output by "
                     f"{effect:.3g} of its largest value; {flops / 1e9:.3g} GFLOP per step by "
                     f"XLA's count")
        runs = {"sdjax": lambda: jax.block_until_ready(compiled(params, *inputs, on)),
                "matmul": run_matmul}
        diff_out = diff_residuals = None
        if FLAGS.reference:
            x_t = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
            image_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
            c_t, t_t = torch.from_numpy(context), torch.from_numpy(t)

            def run_torch():  # StableDiffusionControlNetPipeline's per-step model calls
                with torch.no_grad():
                    down_t, mid_t = reference_controlnet(
                        x_t, t_t, encoder_hidden_states=c_t, controlnet_cond=image_t,
                        conditioning_scale=1.0, guess_mode=False, return_dict=False)
                    sample = reference_unet(
                        x_t, t_t, encoder_hidden_states=c_t, down_block_additional_residuals=down_t,
                        mid_block_additional_residual=mid_t, return_dict=False)[0]
                return sample, down_t, mid_t

            sample_t, down_t, mid_t = run_torch()
            to_nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
            diff_out = timing.relative_difference(out, to_nhwc(sample_t))
            diff_residuals = max(timing.relative_difference(a, to_nhwc(b))
                                 for a, b in zip((*down, mid), (*down_t, mid_t)))
            runs["diffusers (PyTorch)"] = run_torch
        times = timing.interleaved(runs, FLAGS.repeats)
        ceiling = matmul_flops / timing.median(times.pop("matmul")) / 1e9
        ours = timing.median(times["sdjax"])
        gflops = flops / ours / 1e9
        for name, values in times.items():
            t_med = timing.median(values)
            is_ours = name == "sdjax"
            rows.append([f"{size}x{size}", name, t_med, min(values),
                         None if is_ours else ours / t_med, gflops if is_ours else None,
                         ceiling if is_ours else None, gflops / ceiling if is_ours else None,
                         compile_s if is_ours else None, None if is_ours else diff_out,
                         None if is_ours else diff_residuals])
            if not is_ours:
                notes.append(f"target: sdjax <= 0.8x diffusers' time at {size}x{size}: "
                             f"{ours / t_med:.3g}x ({ours:.3g} s vs {t_med:.3g} s)")
        print(f"done step {size}x{size}", file=sys.stderr, flush=True)

    print(f"U-Net + ControlNet, one guided step, preset {FLAGS.preset} (ControlNet conditioning "
          f"embedding {control_config.conditioning_embedding_out_channels}), batch {BATCH}, "
          f"float32, {cores} cores (torch threads {torch.get_num_threads()}), jax "
          f"{jax.__version__} on {jax.devices()[0].platform}, median of {FLAGS.repeats}; load "
          f"average {load_start} at the start, {timing.load_average()} at the end")
    print(f"matmul ceiling: a jitted {matmul_n}² float32 matmul, timed in turn with the others")
    print(timing.table(["latents", "implementation", "median s", "min s", "sdjax / this",
                        "GFLOP/s", "ceiling GFLOP/s", "of ceiling", "compile s",
                        "rel Δ U-Net out", "rel Δ residuals"], rows))
    print("\n".join(notes))


# --- sweep --------------------------------------------------------------------------------------

def sweep_mode() -> None:
    import jax
    import numpy as np
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    import sdjax
    from benchmarks.checkpoints import write_diffusers_folder
    from sdjax.models.controlnet import ControlNetConfig
    from sdjax.sampling import Generator, Request, SamplingSpec
    from sdjax.sampling.controls import Control
    from sdjax.weights.controlnet import ControlNetWeights

    load_start = timing.load_average()
    folder = write_diffusers_folder("tiny", os.path.join(FLAGS.workdir, "tiny"))
    model = sdjax.load_pretrained(folder)
    torch.manual_seed(0)
    reference = randomise_zero_layers(ControlNetModel.from_unet(
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        conditioning_embedding_out_channels=TINY_CONDITIONING), seed=1)
    config = ControlNetConfig.from_unet(model.unet_config,
                                        conditioning_embedding_out_channels=TINY_CONDITIONING)
    controlnet = ControlNetWeights(config=config, params=convert_controlnet(reference, config),
                                   source="benchmark: tiny ControlNetModel.from_unet")
    # Traced every launch (no exported program from an earlier run): the first call compiles.
    generator = Generator(model, exported_programs=False)
    spec = SamplingSpec(sampler="dpmpp_2m", steps=FLAGS.steps, height=SWEEP_IMAGE,
                        width=SWEEP_IMAGE)
    image = np.random.default_rng(0).random((SWEEP_IMAGE, SWEEP_IMAGE, 3), np.float32)
    settings = ([(scale, 0.0, 1.0) for scale in SWEEP_SCALES]
                + [(1.0, start, end) for start, end in SWEEP_WINDOWS])

    seconds, traces, images = [], [], []
    for scale, start, end in settings:
        request = Request(prompt=PROMPT, seed=0, cfg_scale=7.5, controls=[
            Control(controlnet=controlnet, image=image, scale=scale, start=start, end=end)])
        begin = time.perf_counter()
        images.append(generator(request, spec)["images"][0])
        seconds.append(time.perf_counter() - begin)
        traces.append(generator.traces)
    rows = [[f"{scale:g}", f"{start:g}", f"{end:g}", s, n,
             float(np.max(np.abs(drawn - images[0]))) if i else None,
             "first call (trace + compile + run)" if i == 0 else ""]
            for i, ((scale, start, end), s, n, drawn) in enumerate(zip(settings, seconds, traces,
                                                                       images))]
    later = timing.median(seconds[1:])
    print(f"ControlNet sweep through the Generator, tiny model ({SWEEP_IMAGE}x{SWEEP_IMAGE} px, "
          f"{FLAGS.steps} steps dpmpp_2m, one image with guidance; ControlNet conditioning "
          f"embedding {TINY_CONDITIONING}), {timing.num_cores()} cores, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; load average {load_start} at the start, "
          f"{timing.load_average()} at the end")
    print(timing.table(["scale", "start", "end", "seconds", "traces so far",
                        "max |Δ| vs scale 0", "call"], rows))
    print(f"program traces: {traces[0]} after the first call, {traces[-1]} after all "
          f"{len(settings)} (target: 1)")
    print(f"first call {seconds[0]:.3g} s (trace + compile + run) vs {later:.3g} s per later call "
          f"(median of {len(settings) - 1}): {seconds[0] / later:.3g}x")


# --- entry --------------------------------------------------------------------------------------

def main(_):
    unknown = sorted(set(FLAGS.modes) - {"step", "sweep"})
    if unknown:
        raise app.UsageError(f"--modes: unknown {unknown}; choose from step, sweep")
    for mode, run in (("step", step_mode), ("sweep", sweep_mode)):
        if mode in FLAGS.modes:
            run()
            print(flush=True)


if __name__ == "__main__":
    app.run(main)
