"""Where the SD 1.5 U-Net's time goes: each kind of piece at each level, alone, jitted, timed in
turn (batch 2), with its FLOPs from XLA's cost analysis and its GFLOP/s.

    python -m benchmarks.unet_parts --size=32     # latent size of the level-0 maps

Blocked attention loops over blocks, whose FLOPs XLA counts once: its GFLOP/s reads low.
"""
from __future__ import annotations

from absl import app, flags

from benchmarks import timing

flags.DEFINE_integer("size", 32, "latent height/width at level 0")
flags.DEFINE_integer("repeats", 7, "timed runs of each piece (median reported)")
FLAGS = flags.FLAGS


def main(_):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sdjax.models.layers import Conv2D, GEGLUFeedForward, ResnetBlock
    from sdjax.models.unet import Attention, SpatialTransformer

    context, temb = jnp.ones((2, 77, 768)), jnp.ones((2, 1280))
    parts = {}
    for level, channels in enumerate((320, 640, 1280)):
        s = max(FLAGS.size >> level, 1)
        x = jax.random.normal(jax.random.key(0), (2, s, s, channels))
        tokens = x.reshape(2, s * s, channels)
        parts[f"L{level} {s}x{s}x{channels} resnet"] = (ResnetBlock(channels), (x, temb))
        parts[f"L{level} transformer"] = (SpatialTransformer(8, 1, 32), (x, context))
        parts[f"L{level}   self-attention"] = (Attention(8, channels // 8, channels), (tokens,))
        parts[f"L{level}   GEGLU feed-forward"] = (GEGLUFeedForward(4 * channels), (tokens,))
        parts[f"L{level}   GroupNorm"] = (nn.GroupNorm(32), (x,))
        parts[f"L{level}   3x3 conv"] = (Conv2D(channels, (3, 3), padding=((1, 1), (1, 1))), (x,))
    compiled = {}
    for name, (module, args) in parts.items():
        variables = module.init(jax.random.key(0), *args)
        program = jax.jit(lambda v, *a, m=module: m.apply(v, *a)).lower(variables, *args).compile()
        program(variables, *args).block_until_ready()
        compiled[name] = (program, variables, args, timing.xla_flops(program))
    times = timing.interleaved({n: (lambda p=p, v=v, a=a: p(v, *a).block_until_ready())
                                for n, (p, v, a, _) in compiled.items()}, FLAGS.repeats)
    rows = []
    for name, values in times.items():
        seconds, flops = timing.median(values), compiled[name][3]
        rows.append([name, seconds * 1e3, flops / 1e9, flops / seconds / 1e9])
    print(f"U-Net pieces at {FLAGS.size}x{FLAGS.size} latents, batch 2, float32, median of "
          f"{FLAGS.repeats}")
    print(timing.table(["piece", "ms", "GFLOP", "GFLOP/s"], rows))


if __name__ == "__main__":
    app.run(main)
