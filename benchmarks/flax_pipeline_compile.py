"""What diffusers 0.39's `FlaxStableDiffusionPipeline` compiles when called with `jit=True`, as a
worker of benchmarks/compile_time.py: one launch, one JSON line on stdout.

Runs in the reference venv (benchmarks/setup_references.sh: diffusers==0.39.0,
transformers==4.57.6 on the current jax/flax), never in sdjax's own. The pipeline is built from the
preset's configs (`FlaxUNet2DConditionModel`, `FlaxAutoencoderKL`, transformers'
`FlaxCLIPTextModel`, `FlaxDPMSolverMultistepScheduler` = dpmpp_2m, a `CLIPTokenizer` read from
`--tokenizer`) with params that are shapes only (`jax.eval_shape` of each model's init), replicated
over the local devices as `flax.jax_utils.replicate` would. The measured program is the pipeline's
pmapped `_p_generate`: text encoding of the prompts and of the empty negative prompt, the denoising
`fori_loop` with guidance, the VAE decode; one image per device. `lower_s` is its trace + lower,
`compile_s` XLA's compile, with the persistent compilation cache off.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp


def _pipeline(preset_name: str, tokenizer_dir: str):
    """The pipeline and its params (shapes only, no leading device axis)."""
    from diffusers import (FlaxAutoencoderKL, FlaxDPMSolverMultistepScheduler,
                           FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

    from sdjax.weights.presets import PRESETS  # plain dicts: imports nothing else of sdjax

    configs = PRESETS[preset_name]
    key = jax.random.PRNGKey(0)
    unet = FlaxUNet2DConditionModel.from_config(configs["unet"])
    vae = FlaxAutoencoderKL.from_config(configs["vae"])
    text_config = CLIPTextConfig(**configs["text_encoder"])
    # _do_init=False: no weights allocated at construction; params come with each call.
    text_encoder = FlaxCLIPTextModel(text_config, _do_init=False)
    length = text_config.max_position_embeddings
    scheduler = FlaxDPMSolverMultistepScheduler.from_config(
        configs["scheduler"], algorithm_type="dpmsolver++", solver_order=2)
    pipeline = FlaxStableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=length),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None)
    params = {"unet": jax.eval_shape(unet.init_weights, key),
              "vae": jax.eval_shape(vae.init_weights, key),
              "text_encoder": jax.eval_shape(
                  lambda k: text_encoder.init_weights(k, (1, length)), key),
              "scheduler": jax.eval_shape(scheduler.create_state)}
    return pipeline, params


def launch(preset_name: str, steps: int, size: int, tokenizer_dir: str,
           guidance_scale: float) -> dict:
    from diffusers.pipelines.stable_diffusion import pipeline_flax_stable_diffusion as flax_sd

    events = []
    jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
    pipeline, params = _pipeline(preset_name, tokenizer_dir)
    devices = jax.local_device_count()
    # What `pipeline(prompt_ids, replicate(params), split(key), steps, jit=True)` passes to
    # `_p_generate`: everything with a leading device axis, one prompt per device.
    params = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((devices, *x.shape), x.dtype), params)
    prompt_ids = pipeline.prepare_inputs(["a cat"] * devices).reshape(devices, 1, -1)
    prng_seed = jax.random.split(jax.random.PRNGKey(0), devices)
    guidance = jnp.array([guidance_scale] * devices)[:, None]  # as `__call__` makes it
    start = time.perf_counter()
    lowered = flax_sd._p_generate.lower(pipeline, prompt_ids, params, prng_seed, steps, size,
                                        size, guidance, None, None)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    return {"lower_s": lower_s, "compile_s": compile_s, "devices": devices,
            "hits": events.count("/jax/compilation_cache/cache_hits"),
            "misses": events.count("/jax/compilation_cache/cache_misses")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--tokenizer", required=True,
                        help="folder with vocab.json + merges.txt (sdjax's CLIPTokenizer."
                             "save_pretrained writes one)")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    # Both libraries warn once per Flax module built (deprecation): keep stderr to what failed.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    print(json.dumps(launch(args.preset, args.steps, args.size, args.tokenizer,
                            args.guidance_scale)))


if __name__ == "__main__":
    main()
