"""Tiny SD3 and Flux pipelines built with diffusers/transformers (random weights spread beyond
their init), saved as diffusers folders: what the flow-family tests load through the public API
and compare against."""
from __future__ import annotations

import pathlib

import numpy as np

from sdjax.weights.presets import placeholder_t5_tokenizer, preset

# Transformer configs: one SD3.5-style MMDiT (qk norm, a dual-attention block) and Flux-dev.
SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3,
                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                       caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
                       pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                        pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _clip(hidden_act: str, projection: bool):
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
        projection_dim=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def _randomise(models, seed: int) -> None:
    """Every parameter random (diffusers zero-initialises adaLN and output layers), scaled so that
    activations stay moderate."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if p.ndim == 1 and ("norm" in name or "ln" in name or name.endswith("scale")):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
                else:
                    fan_in = p.shape[-1] if p.ndim > 1 else 16
                    p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)


def build_parts(family: str, seed: int = 0) -> tuple[dict, dict, dict]:
    """(torch parts by diffusers component name, transformers tokenizers by name, scheduler
    config) of a tiny SD3 or Flux pipeline."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    configs = preset("tiny_sd3" if family == "sd3" else "tiny_flux")
    vae_config = {k: v for k, v in configs["vae"].items()}
    vae = diffusers.AutoencoderKL(**vae_config)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        **{k: v for k, v in configs[[n for n in configs if configs[n].get("model_type") == "t5"][0]]
           .items() if k not in ("model_type", "architectures")}))
    if family == "sd3":
        parts = {"transformer": diffusers.SD3Transformer2DModel(**SD3_TRANSFORMER), "vae": vae,
                 "text_encoder": _clip("quick_gelu", True), "text_encoder_2": _clip("gelu", True),
                 "text_encoder_3": t5}
        t5_name = "tokenizer_3"
    else:
        parts = {"transformer": diffusers.FluxTransformer2DModel(**FLUX_TRANSFORMER), "vae": vae,
                 "text_encoder": _clip("quick_gelu", False), "text_encoder_2": t5}
        t5_name = "tokenizer_2"
    _randomise(parts.values(), seed)
    scheduler = {k: v for k, v in configs["scheduler"].items() if k != "_class_name"}
    return {k: m.eval() for k, m in parts.items()}, {t5_name: placeholder_t5_tokenizer(160)}, scheduler


def save_folder(family: str, root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The tiny pipeline as a diffusers folder."""
    from benchmarks.checkpoints import save_diffusers_folder

    parts, tokenizers, scheduler = build_parts(family, seed)
    pipeline = "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"
    return save_diffusers_folder(parts, root / f"{family}-diffusers", scheduler=scheduler,
                                 pipeline_class=pipeline,
                                 scheduler_class="FlowMatchEulerDiscreteScheduler",
                                 tokenizers=tokenizers)


def reference_pipeline(family: str, folder: pathlib.Path, **components):
    """diffusers' own pipeline read from the saved folder (CLIP tokenizers included); `components`
    replace the folder's (a scheduler, or None for an absent part)."""
    import diffusers
    import torch

    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_unit_images(images_minus1_1: np.ndarray) -> np.ndarray:
    """sdjax's [-1, 1] images as diffusers' `output_type="np"` [0, 1]."""
    return np.clip(images_minus1_1 / 2 + 0.5, 0.0, 1.0)
