"""diffusers 0.39 `FlaxUNet2DConditionModel` forward, as a worker of benchmarks/unet_forward.py.

Runs in the reference venv (benchmarks/setup_references.sh: diffusers==0.39.0,
transformers==4.57.6 on the current jax/flax), never in sdjax's own. Random weights (timing does not
depend on their values). Stepped by `benchmarks.timing.StepWorker`: `ready <compile seconds>`, then
one timed forward per `run` line on stdin.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from diffusers import FlaxUNet2DConditionModel

from benchmarks import timing
from sdjax.weights.presets import PRESETS  # plain dicts: imports nothing else of sdjax


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    config = PRESETS[args.preset]["unet"]
    fields = {f.name for f in dataclasses.fields(FlaxUNet2DConditionModel)}
    model = FlaxUNet2DConditionModel(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in config.items() if k in fields}, dtype=dtype)
    params = model.init_weights(jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)

    rng = np.random.default_rng(args.size)
    # The reference takes NCHW and transposes inside.
    sample = jnp.asarray(rng.standard_normal((args.batch, config["in_channels"], args.size,
                                              args.size)), dtype)
    context = jnp.asarray(rng.standard_normal((args.batch, 77, config["cross_attention_dim"])),
                          dtype)
    t = jnp.full((args.batch,), 500, jnp.int32)
    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c).sample)
    start = time.perf_counter()
    compiled = forward.lower(params, sample, t, context).compile()
    compile_s = time.perf_counter() - start
    compiled(params, sample, t, context).block_until_ready()
    timing.serve_runs(lambda: compiled(params, sample, t, context).block_until_ready(), compile_s)


if __name__ == "__main__":
    main()
