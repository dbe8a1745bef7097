"""Flow-matching transformers' forward: sdjax (jitted, compile excluded) against diffusers' PyTorch
model on the same random weights and inputs, timed in turn in one run.

    python -m benchmarks.flow_transformers          # SD3 medium + reduced Flux.1 dev, 64² latents
    python -m benchmarks.flow_transformers --models=flux --flux_double=1 --flux_single=2
    python -m benchmarks.flow_transformers --tiny   # tiny widths, 8² latents: what CI runs

sd3: `SD3Transformer2DModel` at the size of `--sd3_preset` (`sdjax.weights.presets.TRANSFORMERS`;
SD3 medium: 24 joint blocks of width 1536, 2.0B params), 64² latents (1024 image tokens), 333 text
tokens of width 4096 (CLIP's 77 + T5's 256, as `StableDiffusion3Pipeline` joins them), pooled 2048,
batch 2 (one image with guidance), timestep 500 (sigma 0.5).

flux: `FluxTransformer2DModel` at Flux.1-dev's width (24 heads x 128, text width 4096, pooled 768,
guidance embedding), 64² latents (packed 2x2: 1024 image tokens), 512 text tokens, batch 1 (dev is
guidance-distilled: one pass per step), sigma 0.5, guidance 3.5 -- but with its depth reduced to
`--flux_double` double-stream and `--flux_single` single-stream blocks (default 2 + 4 of 19 + 38):
the whole model is 11.9B params, 48 GB in float32 for each framework, and both frameworks' copies
must fit in memory at once (this host: 24 GB). Blocks of a kind all do the same work, so the ratio
per block is what carries over to the full depth.

Both sides run float32 with diffusers' own random init (no layer of either starts at zero), the
weights copied into sdjax by `weights.mmdit.mmdit_params` / `weights.flux.flux_params` from the
reference's state dict. Printed per model: ms per forward of each side (median of --repeats, after
one untimed run each whose outputs are compared: "rel Δ" is max |sdjax - PyTorch| / max |PyTorch|),
sdjax / PyTorch (target <= 0.8), XLA's FLOP count of the forward (counted with whole-matrix
attention: XLA counts the blocked CPU attention's loop body once) and sdjax's GFLOP/s against a
jitted float32 matmul timed in turn with the forwards (the host's ceiling), the parameter count,
and the process's resident memory with both models loaded.
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from typing import Any, Callable

from absl import app, flags

from benchmarks import timing

flags.DEFINE_list("models", ["sd3", "flux"], "transformers to compare: sd3, flux")
flags.DEFINE_string("sd3_preset", "sd3_medium", "sd3: architecture "
                    "(sdjax.weights.presets.TRANSFORMERS: sd3_medium, sd35_medium, sd35_large)")
flags.DEFINE_integer("sd3_layers", 0, "sd3: joint blocks (0: the preset's; tiny: 2)")
flags.DEFINE_integer("flux_double", 2, "flux: double-stream blocks (Flux.1: 19; reduced to fit "
                     "both frameworks' float32 weights in memory)")
flags.DEFINE_integer("flux_single", 4, "flux: single-stream blocks (Flux.1: 38)")
flags.DEFINE_integer("size", 0, "latent height and width (default: 64; tiny: 8)")
flags.DEFINE_integer("repeats", 3, "timed runs of each implementation (median reported)")
flags.DEFINE_integer("matmul", 0, "matmul ceiling size n (default: 4096; tiny: 256)")
flags.DEFINE_bool("tiny", False, "tiny widths and depths at 8² latents: seconds; what CI runs")
FLAGS = flags.FLAGS

MODELS = ("sd3", "flux")
SD3_BATCH = 2  # [uncond; cond]: one image with classifier-free guidance
SD3_TEXT = 77 + 256  # CLIP-L/G's 77 tokens, then T5's 256 (StableDiffusion3Pipeline's default)
SD3_TIMESTEP = 500.0  # sigma 0.5, times 1000
FLUX_BATCH = 1  # Flux.1 dev embeds the guidance scale: no unconditional pass
FLUX_TEXT = 512  # FluxPipeline's max_sequence_length for dev
FLUX_SIGMA, FLUX_GUIDANCE = 0.5, 3.5
TINY_TEXT = 8
# Widths small enough to build, compile and run both sides in seconds; SD3 keeps its 16 channels.
TINY_SD3 = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2,
                caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=16,
                pos_embed_max_size=16)
TINY_FLUX = dict(attention_head_dim=32, num_attention_heads=2, axes_dims_rope=[4, 14, 14],
                 joint_attention_dim=32, pooled_projection_dim=16)


@dataclasses.dataclass
class Case:
    """One transformer on both sides: what `compare` needs of it."""
    name: str
    description: str
    reference: Any  # the diffusers torch module
    run_reference: Callable[[], Any]  # one forward, its output as diffusers returns it
    reference_nhwc: Callable[[Any], Any]  # that output -> NHWC numpy, as sdjax returns it
    module: Callable[[str], Any]  # attention implementation -> the sdjax flax module
    params: dict
    inputs: tuple


def state_dict_source(reference):
    """The reference's state dict as a `DictSource` of numpy views (no copy of the weights)."""
    from sdjax.weights.common import DictSource

    return DictSource({k: v.detach().numpy() for k, v in reference.state_dict().items()},
                      name=f"{type(reference).__name__} state dict")


def diffusers_config(preset_name: str, overrides: dict) -> dict:
    """A released transformer's diffusers config with `overrides`; MMDiT-X's dual-attention layers
    are kept only where a reduced depth still has them."""
    from sdjax.weights.presets import TRANSFORMERS

    if preset_name not in TRANSFORMERS:
        raise app.UsageError(f"unknown transformer preset {preset_name!r}; choose from "
                             f"{', '.join(sorted(TRANSFORMERS))}")
    config = {k: v for k, v in TRANSFORMERS[preset_name].items() if not k.startswith("_")}
    config.update(overrides)
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = [i for i in config["dual_attention_layers"]
                                           if i < config["num_layers"]]
    return config


def sd3_case(size: int) -> Case:
    import numpy as np
    import torch
    from diffusers import SD3Transformer2DModel

    from sdjax.models.mmdit import MMDiT, MMDiTConfig
    from sdjax.weights.mmdit import mmdit_params

    overrides = dict(TINY_SD3) if FLAGS.tiny else {}
    if FLAGS.sd3_layers:
        overrides["num_layers"] = FLAGS.sd3_layers
    torch.manual_seed(0)
    reference = SD3Transformer2DModel(**diffusers_config(FLAGS.sd3_preset, overrides)).eval()
    config = MMDiTConfig.from_diffusers(dict(reference.config))
    params = mmdit_params(state_dict_source(reference), config)

    rng = np.random.default_rng(0)
    text = TINY_TEXT if FLAGS.tiny else SD3_TEXT
    latents = rng.standard_normal((SD3_BATCH, size, size, config.in_channels), np.float32)
    context = rng.standard_normal((SD3_BATCH, text, config.joint_attention_dim), np.float32)
    pooled = rng.standard_normal((SD3_BATCH, config.pooled_projection_dim), np.float32)
    t = np.full((SD3_BATCH,), SD3_TIMESTEP, np.float32)
    torch_args = dict(hidden_states=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                      encoder_hidden_states=torch.from_numpy(context),
                      pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t))

    def run_reference():
        with torch.inference_mode():
            return reference(**torch_args, return_dict=False)[0]

    preset = FLAGS.sd3_preset + (" (tiny widths)" if FLAGS.tiny else "")
    return Case(
        name="sd3",
        description=(f"SD3 MMDiT {preset}: {config.num_layers} joint blocks, width "
                     f"{config.inner_dim}, batch {SD3_BATCH}, {size}x{size} latents = "
                     f"{(size // config.patch_size) ** 2} image tokens + {text} text tokens of "
                     f"width {config.joint_attention_dim}, pooled {config.pooled_projection_dim}"),
        reference=reference, run_reference=run_reference,
        reference_nhwc=lambda out: out.numpy().transpose(0, 2, 3, 1),
        module=lambda attention: MMDiT(dataclasses.replace(config, attention=attention)),
        params=params, inputs=(latents, t, context, pooled))


def flux_case(size: int) -> Case:
    import numpy as np
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from sdjax.models.flux import FluxConfig, FluxTransformer
    from sdjax.weights.flux import flux_params
    from sdjax.weights.presets import TRANSFORMERS

    overrides = dict(TINY_FLUX) if FLAGS.tiny else {}
    overrides.update(num_layers=FLAGS.flux_double, num_single_layers=FLAGS.flux_single)
    torch.manual_seed(0)
    reference = FluxTransformer2DModel(**diffusers_config("flux_dev", overrides)).eval()
    config = FluxConfig.from_diffusers(dict(reference.config))
    params = flux_params(state_dict_source(reference), config)

    rng = np.random.default_rng(0)
    text = TINY_TEXT if FLAGS.tiny else FLUX_TEXT
    channels = config.latent_channels
    latents = rng.standard_normal((FLUX_BATCH, size, size, channels), np.float32)
    context = rng.standard_normal((FLUX_BATCH, text, config.joint_attention_dim), np.float32)
    pooled = rng.standard_normal((FLUX_BATCH, config.pooled_projection_dim), np.float32)
    sigma = np.full((FLUX_BATCH,), FLUX_SIGMA, np.float32)
    guidance = np.full((FLUX_BATCH,), FLUX_GUIDANCE, np.float32)
    # FluxPipeline's own packing and position ids (sdjax builds both inside the model).
    packed = FluxPipeline._pack_latents(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                                        FLUX_BATCH, channels, size, size)
    torch_args = dict(
        hidden_states=packed, encoder_hidden_states=torch.from_numpy(context),
        pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigma),
        guidance=torch.from_numpy(guidance), txt_ids=torch.zeros(text, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(FLUX_BATCH, size // 2, size // 2, "cpu",
                                                       torch.float32))

    def run_reference():
        with torch.inference_mode():
            return reference(**torch_args, return_dict=False)[0]

    vae_scale = 8  # _unpack_latents takes the image size in pixels
    full = TRANSFORMERS["flux_dev"]
    return Case(
        name="flux",
        description=(f"Flux.1-dev width{' (tiny)' if FLAGS.tiny else ''}: {config.num_layers} "
                     f"double + {config.num_single_layers} single blocks (of Flux.1's "
                     f"{full['num_layers']} + {full['num_single_layers']}: depth reduced so that "
                     f"both frameworks' float32 copies fit in memory; the per-block ratio carries "
                     f"over), width {config.inner_dim}, batch {FLUX_BATCH}, {size}x{size} latents "
                     f"= {(size // 2) ** 2} image tokens + {text} text tokens of width "
                     f"{config.joint_attention_dim}, pooled {config.pooled_projection_dim}, "
                     f"guidance {FLUX_GUIDANCE}"),
        reference=reference, run_reference=run_reference,
        reference_nhwc=lambda out: FluxPipeline._unpack_latents(
            out, size * vae_scale, size * vae_scale, vae_scale).numpy().transpose(0, 2, 3, 1),
        module=lambda attention: FluxTransformer(dataclasses.replace(config,
                                                                     attention=attention)),
        params=params, inputs=(latents, sigma, context, pooled, guidance))


def compare(case: Case, run_matmul, matmul_flops: float) -> tuple[list, list[str]]:
    """(table rows, notes) of one transformer: compile, FLOPs, agreement, interleaved timing."""
    import jax
    import numpy as np

    # Zero-copy on the CPU: the converted numpy params are 64-byte aligned.
    params = jax.device_put(case.params)
    inputs = tuple(jax.device_put(x) for x in case.inputs)
    model, unblocked = case.module("xla"), case.module("reference")
    start = time.perf_counter()
    compiled = jax.jit(lambda p, *a: model.apply({"params": p}, *a)).lower(
        params, *inputs).compile()
    compile_s = time.perf_counter() - start
    flops = timing.xla_flops(jax.jit(lambda p, *a: unblocked.apply({"params": p}, *a)).lower(
        params, *inputs))

    ours = np.asarray(compiled(params, *inputs))  # also the warm-up of each side
    expected = case.reference_nhwc(case.run_reference())
    diff = timing.relative_difference(ours, expected)
    resident = timing.rss_mib()
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"done {case.name}: compiled, outputs compared; timing", file=sys.stderr, flush=True)

    times = timing.interleaved({"sdjax": lambda: compiled(params, *inputs).block_until_ready(),
                                "matmul": run_matmul,
                                "diffusers (PyTorch)": case.run_reference}, FLAGS.repeats)
    ceiling = matmul_flops / timing.median(times.pop("matmul")) / 1e9
    ours_s = timing.median(times["sdjax"])
    theirs_s = timing.median(times["diffusers (PyTorch)"])
    gflops = flops / ours_s / 1e9
    rows = [[case.name, "sdjax", ours_s * 1e3, min(times["sdjax"]) * 1e3, None, flops / 1e9,
             gflops, ceiling, gflops / ceiling, compile_s, None],
            [case.name, "diffusers (PyTorch)", theirs_s * 1e3,
             min(times["diffusers (PyTorch)"]) * 1e3, ours_s / theirs_s, None,
             flops / theirs_s / 1e9, None, None, None, diff]]
    notes = [f"{case.name}: {case.description}; {count / 1e9:.3g}B params; {resident / 1024:.3g} "
             f"GiB resident with both models loaded",
             f"{case.name}: sdjax / diffusers = {ours_s / theirs_s:.3g} ({ours_s * 1e3:.0f} ms vs "
             f"{theirs_s * 1e3:.0f} ms; target <= 0.8); outputs agree to {diff:.2g} (relative)"]
    return rows, notes


def main(_):
    import jax
    import torch

    unknown = sorted(set(FLAGS.models) - set(MODELS))
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    size = FLAGS.size or (8 if FLAGS.tiny else 64)
    cores = timing.num_cores()
    torch.set_num_threads(cores)
    load_start = timing.load_average()
    matmul_n = FLAGS.matmul or (256 if FLAGS.tiny else 4096)
    run_matmul, matmul_flops = timing.matmul_run(matmul_n)

    rows, notes = [], []
    for name, build in (("sd3", sd3_case), ("flux", flux_case)):
        if name in FLAGS.models:
            case_rows, case_notes = compare(build(size), run_matmul, matmul_flops)
            rows += case_rows
            notes += case_notes
            gc.collect()  # both frameworks' copies of this model go before the next is built

    print(f"Flow-matching transformer forward, float32, random weights, {cores} cores (torch "
          f"threads {torch.get_num_threads()}), jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, median of {FLAGS.repeats}; load average {load_start} at "
          f"the start, {timing.load_average()} at the end")
    print(f"matmul ceiling: a jitted {matmul_n}² float32 matmul, timed in turn with the others; "
          f"GFLOP: XLA's count of sdjax's forward (PyTorch's row: the same count over its time)")
    print(timing.table(["model", "implementation", "median ms", "min ms", "sdjax / this", "GFLOP",
                        "GFLOP/s", "ceiling GFLOP/s", "of ceiling", "compile s", "rel Δ vs sdjax"],
                       rows))
    print("\n".join(notes))


if __name__ == "__main__":
    app.run(main)
