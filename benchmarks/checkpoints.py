"""Random-weight checkpoints at real sizes, written in the formats people have, for benchmarks.

Built with the reference implementations (torch, diffusers, transformers: the `test` extra), so the
files are exactly what those libraries write. Cached in a work folder: building SD 1.5 takes a minute.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

from sdjax.weights.presets import preset


def save_diffusers_folder(parts: dict, folder: str | os.PathLike, *, scheduler: dict,
                          pipeline_class: str = "StableDiffusionPipeline",
                          scheduler_class: str = "PNDMScheduler",
                          tokenizers: Optional[dict] = None) -> pathlib.Path:
    """Save reference models {"unet" or "transformer", "vae", "text_encoder"[, _2, _3]} (torch) as
    a diffusers folder with model_index.json, tokenizers and the scheduler config. A text
    encoder's tokenizer is `tokenizers[name]` (anything with save_pretrained, e.g. a T5 tokenizer)
    when given, else sdjax's shipped CLIP vocabulary, padded as the encoder's family pads."""
    from sdjax.text.tokenizer import CLIPTokenizer

    folder = pathlib.Path(folder)
    index = {"_class_name": pipeline_class}
    tokenizers = tokenizers or {}
    for name, model in parts.items():
        model.save_pretrained(folder / name)
        library = "diffusers" if name in ("unet", "vae", "transformer") else "transformers"
        index[name] = [library, type(model).__name__]
        if name.startswith("text_encoder"):
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            tokenizer = tokenizers.get(tokenizer_name)
            if tokenizer is None:
                pad = "!" if model.config.hidden_act == "gelu" else "<|endoftext|>"
                tokenizer = CLIPTokenizer.default(pad_token=pad)
            tokenizer.save_pretrained(folder / tokenizer_name)
            index[tokenizer_name] = ["transformers", type(tokenizer).__name__]
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": scheduler_class, **scheduler}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_diffusers_folder(preset_name: str, folder: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """A diffusers folder with random weights of the preset's architecture; reused if complete."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = pathlib.Path(folder)
    done = folder / ".complete"
    if done.exists():
        return folder
    configs = preset(preset_name)
    torch.manual_seed(seed)
    parts = {"unet": UNet2DConditionModel(**configs["unet"]), "vae": AutoencoderKL(**configs["vae"]),
             "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    if "text_encoder_2" in configs:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**configs["text_encoder_2"]))
    save_diffusers_folder(parts, folder, scheduler=configs["scheduler"],
                          pipeline_class="StableDiffusionXLPipeline" if "text_encoder_2" in parts
                          else "StableDiffusionPipeline")
    done.touch()
    return folder
