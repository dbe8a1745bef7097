"""A tiny SD3-family model of the shapes world, for guidance and sampler studies of the flow
families on a CPU (docs/flow.md, "A guidance study"): a small MMDiT trained with the rectified-flow
objective on the embedded default model's VAE and text encoder (frozen; the encoder fills both
CLIP slots, no T5: SD3 then conditions on zeros in its place, as diffusers does).

`write_start_model(path)` writes the untrained model (native sdjax folder) that
configs/train_flow_shapes.py trains from.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from sdjax import DEFAULT_MODEL
from sdjax.models.mmdit import MMDiTConfig
from sdjax.weights import mmdit as mmdit_weights
from sdjax.weights.clip import load_clip_native
from sdjax.weights.presets import _random_leaf
from sdjax.weights.pretrained import Pretrained, load_pretrained, save_pretrained

# 16x16x4 latents of the 32 px shapes VAE -> 64 patches; the two CLIP slots' 64-wide states side
# by side give the 128-wide context, their 64-wide projections the 128-wide pooled vector.
TRANSFORMER = MMDiTConfig(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                          num_layers=6, attention_head_dim=32, num_attention_heads=4,
                          joint_attention_dim=128, caption_projection_dim=128,
                          pooled_projection_dim=128, pos_embed_max_size=16, qk_norm="rms_norm")
# 64 latent tokens: SD3's shift of 3 is for 4096; no shift at this size.
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
             "shift": 1.0}
# SD3 without T5 still appends its zero states; one token is enough here.
MAX_SEQUENCE_LENGTH = 1


def write_start_model(path: str | os.PathLike, seed: int = 0) -> Pretrained:
    """The untrained shapes SD3: the default model's VAE, its text encoder in both CLIP slots with
    the shapes CLIP's trained text projection (what SD3's pooled vector needs), and a new MMDiT
    initialised for training (kernels N(0, 1/fan_in), biases zero, adaLN-Zero's modulations and the
    output layer zero, so every block starts as the identity)."""
    base = load_pretrained(DEFAULT_MODEL)
    clip_config, clip_params = load_clip_native(os.path.join(DEFAULT_MODEL, "clip"))
    text_config = dataclasses.replace(base.text_configs[0],
                                      projection_dim=clip_config.text.projection_dim)
    text_params = {**base.params["text_encoder"],
                   "text_projection": clip_params["text_model"]["text_projection"]}
    shapes = mmdit_weights.mmdit_shapes(TRANSFORMER)
    rng = np.random.default_rng(seed)

    def init(path_, leaf):
        name = jax.tree_util.keystr(path_)
        if ("adaLN" in name or "norm1" in name or "norm_out" in name or "proj_out" in name) \
                and name.endswith("['kernel']"):
            return np.zeros(leaf.shape, np.float32)
        return _random_leaf(rng, name, leaf.shape, None, for_training=True)

    transformer = jax.tree_util.tree_map_with_path(init, shapes)
    model = Pretrained(
        family="sd3", unet_config=None, vae_config=base.vae_config,
        text_configs=(text_config, text_config), tokenizers=(base.tokenizers[0],) * 2,
        params={"transformer": transformer, "vae": base.params["vae"],
                "text_encoder": text_params, "text_encoder_2": text_params},
        scheduler_config=dict(SCHEDULER), source="shapes-sd3-start",
        transformer_config=TRANSFORMER)
    save_pretrained(model, path, overwrite=True)
    return model
