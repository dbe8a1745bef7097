"""The same LoRA on the reference models (diffusers U-Net, transformers CLIP text encoder) through
peft, as diffusers injects one (`unet.add_adapter(LoraConfig(...))`): for the LoRA benchmarks
(benchmarks/lora.py, and the LoRA training step of benchmarks/train_step.py).

Layers are named by sdjax path and found on the torch side by their diffusers / transformers module
name (`sdjax.adapters.names`); transformers 5 builds `CLIPTextModel` without the `text_model.`
module prefix that the names (and files) carry.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

_TEXT_MODEL_PREFIX = "text_model."


def module_name(torch_model, reference_name: str) -> str:
    """`reference_name` as `torch_model` names the module (a transformers 5 CLIP text model has
    no `text_model.` level)."""
    if reference_name.startswith(_TEXT_MODEL_PREFIX) and not hasattr(torch_model, "text_model"):
        return reference_name[len(_TEXT_MODEL_PREFIX):]
    return reference_name


def inject(torch_model, reference_names: Sequence[str], rank: int, alpha: float,
           init: object = False) -> dict[str, object]:
    """Add a peft LoRA of `rank` and `alpha` on exactly the named modules of `torch_model`
    (diffusers' `add_adapter` where the model has one, else peft's `inject_adapter_in_model`);
    returns {reference name: the peft layer}. `init`: peft's `init_lora_weights`."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {name: module_name(torch_model, name) for name in reference_names}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(names.values()),
                        init_lora_weights=init)
    if hasattr(torch_model, "add_adapter") and hasattr(torch_model, "fuse_lora"):  # diffusers
        torch_model.add_adapter(config)
    else:
        inject_adapter_in_model(config, torch_model)
    return {name: torch_model.get_submodule(torch_name) for name, torch_name in names.items()}


def set_factors(layers: Mapping[str, object], factors: Mapping[str, tuple]) -> None:
    """Copy low-rank factors in sdjax's layout ({reference name: (down (in, r), up (r, out))})
    into the peft layers of `inject` (lora_A (r, in[, 1, 1]), lora_B (out, r[, 1, 1]))."""
    import torch

    with torch.no_grad():
        for name, (down, up) in factors.items():
            a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
            down = np.asarray(down, np.float32).reshape(-1, a.shape[0])
            a.copy_(torch.from_numpy(np.ascontiguousarray(down.T)).reshape(a.shape))
            b.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(up, np.float32).T)).reshape(b.shape))


def fuse(models: Sequence[object]) -> None:
    """diffusers' `fuse_lora` of each model (its own for a diffusers model, the text-encoder one
    for a transformers model)."""
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    for model in models:
        model.fuse_lora() if hasattr(model, "fuse_lora") else fuse_text_encoder_lora(model)


def unfuse(models: Sequence[object]) -> None:
    from diffusers.loaders.lora_base import unfuse_text_encoder_lora

    for model in models:
        model.unfuse_lora() if hasattr(model, "unfuse_lora") else unfuse_text_encoder_lora(model)


def trainable_parameters(layers: Mapping[str, object]) -> list:
    """The LoRA factors of the peft layers of `inject` (their base layers are frozen)."""
    return [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
