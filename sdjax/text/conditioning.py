"""Token ids -> what the U-Net is conditioned on: the text encoders' hidden states with emphasis
applied, SDXL's pooled embedding and its size micro-conditioning. Sampling and training both
condition through here."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.clip import CLIPTextModel, text_hidden_state
from sdjax.models.layers import model_variables
from sdjax.text import prompts


def encode_text(arch, params: dict, ids: jax.Array, weights: jax.Array, clip_skip: int = 0) -> dict:
    """Token ids (B, encoders, chunks, 77) and emphasis weights (B, chunks, 77) -> the U-Net's
    conditioning. `arch` is a `weights.architecture.Architecture` (family, text_encoders, dtype).

    Returns {"context": (B, chunks*77, D)} plus, for SDXL, {"text_embeds": (B, P)} (the second
    encoder's pooled, projected output of the first chunk).
    """
    batch, _, chunks, width = ids.shape
    flat_weights = weights.reshape(batch * chunks, width)
    contexts, pooled = [], None
    sdxl = arch.family == "sdxl"
    for index, config in enumerate(arch.text_encoders):
        name = "text_encoder" if index == 0 else "text_encoder_2"
        model = CLIPTextModel(config, dtype=arch.dtype)
        output = model.apply(model_variables(params, name), ids[:, index].reshape(batch * chunks, width))
        # SDXL conditions on the penultimate layer without the final norm (diffusers' convention).
        hidden = text_hidden_state(model, params[name], output,
                                   clip_skip=clip_skip + 1 if sdxl else clip_skip,
                                   apply_final_norm=not sdxl)
        hidden = prompts.apply_emphasis(hidden, flat_weights)
        contexts.append(hidden.reshape(batch, chunks * width, -1))
        if output.text_embeds is not None and sdxl:
            pooled = output.text_embeds.reshape(batch, chunks, -1)[:, 0]
    cond = {"context": jnp.concatenate(contexts, axis=-1)}
    if sdxl:
        cond["text_embeds"] = pooled
    return cond


def sdxl_time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's micro-conditioning: original size, crop top-left, target size (no crop, same size)."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (batch, 1))
