"""Architectures of the released Stable Diffusion models, as the `config.json` dicts their
diffusers / transformers folders carry. For random-weight benchmarks and tests at full size, and to
build a model from scratch with a known shape."""
from __future__ import annotations

import copy
import re

_SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                 "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False,
                 "set_alpha_to_one": False}

_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}

_OPENAI_CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                       "num_hidden_layers": 12, "num_attention_heads": 12,
                       "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                       "layer_norm_eps": 1e-5, "projection_dim": 768,
                       "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

_FLOW_VAE = {**_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
             "scaling_factor": 1.5305, "shift_factor": 0.0609}
# 32 groups as every released VAE (the single-file reader assumes them).
_TINY_FLOW_VAE = {**_FLOW_VAE, "block_out_channels": [32, 32], "layers_per_block": 1,
                  "down_block_types": ["DownEncoderBlock2D"] * 2,
                  "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 32,
                  "sample_size": 32}
_TINY_T5 = {"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": 160,
            "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
            "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6}
# T5 v1.1 XXL, the third text encoder of SD3 and the second of Flux.
T5_XXL = {"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": 32128,
          "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6}
_FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "shift": 3.0}
_FLUX_DEV_SCHEDULER = {**_FLOW_SCHEDULER, "use_dynamic_shifting": True, "base_shift": 0.5,
                       "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
# The released transformers' configs (diffusers config.json), for benchmarks at full size.
TRANSFORMERS = {
    "sd3_medium": {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2,
                   "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                   "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
                   "out_channels": 16, "pos_embed_max_size": 192},
    "sd35_medium": {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2,
                    "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                    "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
                    "out_channels": 16, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                    "dual_attention_layers": list(range(13))},
    "sd35_large": {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2,
                   "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
                   "num_attention_heads": 38, "joint_attention_dim": 4096,
                   "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
                   "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    "flux_dev": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
                 "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                 "num_attention_heads": 24, "joint_attention_dim": 4096,
                 "pooled_projection_dim": 768, "guidance_embeds": True,
                 "axes_dims_rope": [16, 56, 56]},
}

PRESETS = {
    # A few hundred thousand U-Net params: smoke tests and CI versions of the benchmarks.
    "tiny": {
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4,
                 "block_out_channels": [32, 64], "layers_per_block": 1,
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                 "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8,
                 "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"},
        "vae": {**_VAE, "block_out_channels": [16, 32], "layers_per_block": 1,
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "sample_size": 16},
        "text_encoder": {**_OPENAI_CLIP_L_TEXT, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 32},
        "scheduler": _SD_SCHEDULER,
    },
    # The embedded default model (sdjax/assets/default_model), trained on the shapes world at
    # 32 px: a factor-2 VAE (16x16x4 latents), cross-attention at 8x8 and 4x4, and the text tower
    # of the shapes CLIP (configs/shapes_clip.py), whose shape it must match.
    "shapes": {
        "unet": {"sample_size": 16, "in_channels": 4, "out_channels": 4,
                 "block_out_channels": [32, 64, 128], "layers_per_block": 1,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                      "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "attention_head_dim": 4, "cross_attention_dim": 64, "norm_num_groups": 8,
                 "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"},
        "vae": {**_VAE, "block_out_channels": [32, 64], "layers_per_block": 1,
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "sample_size": 32},
        "text_encoder": {**_OPENAI_CLIP_L_TEXT, "hidden_size": 64, "intermediate_size": 256,
                         "num_hidden_layers": 3, "num_attention_heads": 4, "projection_dim": 64},
        "scheduler": {**_SD_SCHEDULER, "timestep_spacing": "trailing"},
    },
    "sd15": {
        "unet": {"sample_size": 64, "in_channels": 4, "out_channels": 4,
                 "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
                 "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"},
        "vae": dict(_VAE),
        "text_encoder": _OPENAI_CLIP_L_TEXT,
        "scheduler": _SD_SCHEDULER,
    },
    "sd21": {
        "unet": {"sample_size": 96, "in_channels": 4, "out_channels": 4,
                 "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                 "use_linear_projection": True, "upcast_attention": True, "norm_num_groups": 32,
                 "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"},
        "vae": {**_VAE, "sample_size": 768},
        "text_encoder": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                         "num_hidden_layers": 23, "num_attention_heads": 16,
                         "max_position_embeddings": 77, "hidden_act": "gelu",
                         "layer_norm_eps": 1e-5, "projection_dim": 512,
                         "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "scheduler": {**_SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "sdxl": {
        "unet": {"sample_size": 128, "in_channels": 4, "out_channels": 4,
                 "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                 "cross_attention_dim": 2048, "use_linear_projection": True,
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
                 "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"},
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _OPENAI_CLIP_L_TEXT,
        "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                           "num_hidden_layers": 32, "num_attention_heads": 20,
                           "max_position_embeddings": 77, "hidden_act": "gelu",
                           "layer_norm_eps": 1e-5, "projection_dim": 1280,
                           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "scheduler": {**_SD_SCHEDULER, "timestep_spacing": "leading"},
    },
}


# Tiny random-weight SD3 and Flux models: the whole flow pipeline on a CPU in seconds
# (configs/sd35.py:tiny, flux_dev.py:tiny). 16 latent channels as the real ones.
PRESETS["tiny_sd3"] = {
    "transformer": {"_class_name": "SD3Transformer2DModel", "sample_size": 16, "patch_size": 2,
                    "in_channels": 16, "num_layers": 2, "attention_head_dim": 8,
                    "num_attention_heads": 2, "joint_attention_dim": 32,
                    "caption_projection_dim": 16, "pooled_projection_dim": 32,
                    "out_channels": 16, "pos_embed_max_size": 32, "qk_norm": "rms_norm"},
    "vae": _TINY_FLOW_VAE,
    "text_encoder": {**_OPENAI_CLIP_L_TEXT, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 16},
    "text_encoder_2": {**_OPENAI_CLIP_L_TEXT, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 16,
                       "hidden_act": "gelu"},
    "text_encoder_3": _TINY_T5,
    "scheduler": _FLOW_SCHEDULER,
}
PRESETS["tiny_flux"] = {
    "transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
                    "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                    "num_attention_heads": 2, "joint_attention_dim": 32,
                    "pooled_projection_dim": 16, "guidance_embeds": True,
                    "axes_dims_rope": [4, 6, 6]},
    "vae": {**_TINY_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "text_encoder": {**_OPENAI_CLIP_L_TEXT, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 16},
    "text_encoder_2": _TINY_T5,
    "scheduler": _FLUX_DEV_SCHEDULER,
}


def placeholder_t5_tokenizer(vocab_size: int):
    """A T5 tokenizer for random-weight models (no T5 vocabulary ships with sdjax): T5's special
    tokens, then single characters, each word piece of a prompt splitting into characters."""
    import string

    from sdjax.text.t5_tokenizer import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(string.ascii_letters + string.digits
                                                    + string.punctuation)
    pieces += ["\u2581" + c for c in string.ascii_letters + string.digits]
    pieces = pieces[:vocab_size]
    return T5Tokenizer([(p, 0.0 if i < 3 else -1.0 - 0.01 * i) for i, p in enumerate(pieces)],
                       name="placeholder T5 vocabulary")


def preset(name: str) -> dict:
    """A deep copy of one preset's reference config dicts, by part name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def random_pretrained(name: str, seed: int = 0, dtype=None, for_training: bool = False):
    """A `Pretrained` of the preset's architecture with sdjax's random initialisation: for
    benchmarks and smoke runs of the whole pipeline without any checkpoint file.

    Default: N(0, 0.02) weights everywhere, so every layer contributes (what parity-style smoke
    runs want). `for_training`: the start of a training run instead: kernels N(0, 1/fan_in) (flax's
    lecun_normal, which keeps activations at unit scale in narrow models too) and, as the original
    latent-diffusion U-Net does, the last layer of every U-Net residual branch (resnet conv2,
    transformer proj_out) and its conv_out zero, so each block starts as the identity. The flow
    families' transformers always take the fan-in init (their adaLN modulation would be ~0)."""
    import dataclasses

    import jax
    import numpy as np

    model = abstract_pretrained(name)
    # Transformers with adaLN at N(0, 0.02) modulate by ~0: their outputs ignore the conditioning,
    # so the flow families' random models always take the fan-in init.
    for_training = for_training or model.transformer_config is not None
    rng = np.random.default_rng(seed)
    params = {}
    for part, part_shapes in model.params.items():
        # N(0, 0.02) weights, zero biases, unit norm scales: a well-scaled network of the right
        # shape; numpy draws them far faster than tracing one init per layer would.
        params[part] = jax.tree_util.tree_map_with_path(
            lambda path, s: _random_leaf(rng, f"{part}{jax.tree_util.keystr(path)}", s.shape, dtype,
                                         for_training), part_shapes)
    return dataclasses.replace(model, params=params, source=f"random:{name}")


def abstract_pretrained(name: str):
    """A `Pretrained` of the preset's architecture whose params are shapes only (ShapeDtypeStruct
    leaves): what compile-time benchmarks lower programs over, and what random_pretrained fills."""
    from sdjax.models.clip import CLIPTextConfig
    from sdjax.models.unet import UNetConfig
    from sdjax.models.vae import VAEConfig
    from sdjax.text.tokenizer import CLIPTokenizer
    from sdjax.weights import clip as clip_weights
    from sdjax.weights import unet as unet_weights
    from sdjax.weights import vae as vae_weights
    from sdjax.weights.pretrained import TEXT_ENCODER_NAMES, Pretrained, family_of

    configs = preset(name)
    if "transformer" in configs:
        return _abstract_flow(name, configs)
    unet_config = UNetConfig.from_diffusers(configs["unet"])
    vae_config = VAEConfig.from_diffusers(configs["vae"])
    text_configs = tuple(
        CLIPTextConfig.from_transformers(configs[n], with_projection=n == "text_encoder_2")
        for n in TEXT_ENCODER_NAMES if n in configs)
    shapes = {"unet": unet_weights.unet_shapes(unet_config), "vae": vae_weights.vae_shapes(vae_config)}
    for n, config in zip(TEXT_ENCODER_NAMES, text_configs):
        shapes[n] = clip_weights.clip_text_shapes(config)
    tokenizers = tuple(CLIPTokenizer.default(pad_token="!" if c.hidden_act == "gelu" else "<|endoftext|>")
                       for c in text_configs)
    return Pretrained(family=family_of(text_configs), unet_config=unet_config, vae_config=vae_config,
                      text_configs=text_configs, tokenizers=tokenizers, params=shapes,
                      scheduler_config=configs["scheduler"], source=f"abstract:{name}")


def _abstract_flow(name: str, configs: dict):
    from sdjax.models.clip import CLIPTextConfig
    from sdjax.models.flux import FluxConfig
    from sdjax.models.mmdit import MMDiTConfig
    from sdjax.models.t5 import T5Config
    from sdjax.models.vae import VAEConfig
    from sdjax.text.tokenizer import CLIPTokenizer
    from sdjax.weights import clip as clip_weights
    from sdjax.weights import flux as flux_weights
    from sdjax.weights import mmdit as mmdit_weights
    from sdjax.weights import t5 as t5_weights
    from sdjax.weights import vae as vae_weights
    from sdjax.weights.pretrained import TEXT_ENCODER_NAMES, TRANSFORMER_FAMILIES, Pretrained

    family = TRANSFORMER_FAMILIES[configs["transformer"]["_class_name"]]
    transformer_dict = {k: v for k, v in configs["transformer"].items() if k != "_class_name"}
    if family == "sd3":
        transformer = MMDiTConfig.from_diffusers(transformer_dict)
        shapes = {"transformer": mmdit_weights.mmdit_shapes(transformer)}
    else:
        transformer = FluxConfig.from_diffusers(transformer_dict)
        shapes = {"transformer": flux_weights.flux_shapes(transformer)}
    vae_config = VAEConfig.from_diffusers(configs["vae"])
    shapes["vae"] = vae_weights.vae_shapes(vae_config)
    text_configs, tokenizers = [], []
    for n in TEXT_ENCODER_NAMES:
        if n not in configs:
            continue
        if configs[n].get("model_type") == "t5":
            config = T5Config.from_transformers(configs[n])
            shapes[n] = t5_weights.t5_shapes(config)
            tokenizers.append(placeholder_t5_tokenizer(config.vocab_size))
        else:
            config = CLIPTextConfig.from_transformers(configs[n], with_projection=family == "sd3")
            shapes[n] = clip_weights.clip_text_shapes(config)
            tokenizers.append(CLIPTokenizer.default(
                pad_token="!" if config.hidden_act == "gelu" else "<|endoftext|>"))
        text_configs.append(config)
    return Pretrained(family=family, unet_config=None, vae_config=vae_config,
                      text_configs=tuple(text_configs), tokenizers=tuple(tokenizers), params=shapes,
                      scheduler_config=configs["scheduler"], source=f"abstract:{name}",
                      transformer_config=transformer)


# U-Net kernels that end a residual branch: zero in a training init (see random_pretrained).
_ZERO_INIT_FOR_TRAINING = re.compile(
    r"^unet(\['conv_out'\]|.*\['resnets_\d+'\]\['conv2'\]|.*\['attentions_\d+'\]\['proj_out'\])"
    r"\['kernel'\]$")


def _random_leaf(rng, path: str, shape, dtype, for_training: bool = False):
    import numpy as np

    if path.endswith("['scale']"):
        value = np.ones(shape, np.float32)
    elif len(shape) <= 1:
        value = np.zeros(shape, np.float32)
    elif for_training and _ZERO_INIT_FOR_TRAINING.match(path):
        value = np.zeros(shape, np.float32)
    elif for_training and path.endswith("['kernel']"):
        # Flax layout (..., in, out): fan_in is every axis but the last.
        fan_in = int(np.prod(shape[:-1]))
        value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    else:
        value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return value.astype(dtype or np.float32)
