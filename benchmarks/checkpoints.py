"""Random-weight checkpoints at real sizes, written in the formats people have, for benchmarks.

Built with the reference implementations (torch, diffusers, transformers: the `test` extra), so the
files are exactly what those libraries write. Cached in a work folder: building SD 1.5 takes a minute.
"""
from __future__ import annotations

import json
import os
import pathlib

from sdjax.presets import preset


def write_diffusers_folder(preset_name: str, folder: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """A diffusers folder (model_index.json, unet/, vae/, text_encoder/[_2], tokenizer/[_2],
    scheduler/) with random weights of the preset's architecture; reused if already complete."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdjax.text import CLIPTokenizer

    folder = pathlib.Path(folder)
    done = folder / ".complete"
    if done.exists():
        return folder
    configs = preset(preset_name)
    torch.manual_seed(seed)
    index = {"_class_name": "StableDiffusionXLPipeline" if preset_name == "sdxl"
             else "StableDiffusionPipeline"}
    UNet2DConditionModel(**configs["unet"]).save_pretrained(folder / "unet")
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    AutoencoderKL(**configs["vae"]).save_pretrained(folder / "vae")
    index["vae"] = ["diffusers", "AutoencoderKL"]
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if encoder not in configs:
            continue
        config = CLIPTextConfig(**configs[encoder])
        with_projection = encoder == "text_encoder_2"
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
        model.save_pretrained(folder / encoder)
        index[encoder] = ["transformers", type(model).__name__]
        pad = "!" if config.hidden_act == "gelu" else "<|endoftext|>"
        CLIPTokenizer.default(pad_token=pad).save_pretrained(folder / tokenizer)
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = {"_class_name": "PNDMScheduler", **configs["scheduler"]}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    done.touch()
    return folder
