"""Token ids -> what the denoiser is conditioned on: the text encoders' hidden states with emphasis
applied, SDXL's pooled embedding and its size micro-conditioning, and the joined CLIP + T5
conditioning of SD3 and Flux. Sampling and training both condition through here."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.clip import CLIPTextModel, text_hidden_state
from sdjax.models.layers import model_variables
from sdjax.models.t5 import T5Config, T5EncoderModel
from sdjax.text import prompts

# params keys of the text encoders, in the order of Architecture.text_encoders (diffusers' names).
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def encode_text(arch, params: dict, ids: jax.Array, weights: jax.Array, clip_skip: int = 0,
                t5_ids: jax.Array | None = None, t5_weights: jax.Array | None = None) -> dict:
    """Token ids (B, CLIP encoders, chunks, 77) and emphasis weights (B, chunks, 77) -> the
    denoiser's conditioning. `arch` is a `weights.architecture.Architecture` (family,
    text_encoders, dtype); the flow families also take T5's ids and weights (B, max_sequence_length).

    Returns {"context": (B, chunks*77, D)} plus, for SDXL, {"text_embeds": (B, P)} (the second
    encoder's pooled, projected output of the first chunk); for SD3 and Flux see `_encode_flow`.
    """
    if arch.flow:
        return _encode_flow(arch, params, ids, weights, clip_skip, t5_ids, t5_weights)
    batch, _, chunks, width = ids.shape
    flat_weights = weights.reshape(batch * chunks, width)
    contexts, pooled = [], None
    sdxl = arch.family == "sdxl"
    for index, config in enumerate(arch.text_encoders):
        name = TEXT_ENCODER_NAMES[index]
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


def _encode_flow(arch, params, ids, weights, clip_skip, t5_ids, t5_weights) -> dict:
    """SD3: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's
    states along the sequence ({"context": (B, chunks*77 + L, D_T5)}); pooled = both projected
    pooled outputs concatenated. Without a T5 encoder (a checkpoint saved without it) its states are
    zeros, as diffusers' pipeline makes them. Flux: context = T5's states; pooled = CLIP-L's pooled
    output without projection. Pooled embeddings come from each prompt's first chunk."""
    batch, _, chunks, width = ids.shape
    flat_weights = weights.reshape(batch * chunks, width)
    clip_states, pooled = [], []
    t5_states = None
    for index, config in enumerate(arch.text_encoders):
        name = TEXT_ENCODER_NAMES[index]
        if isinstance(config, T5Config):
            model = T5EncoderModel(config, dtype=arch.dtype)
            t5_states = model.apply(model_variables(params, name), t5_ids)
            t5_states = prompts.apply_emphasis(t5_states.astype(jnp.float32), t5_weights)
            continue
        model = CLIPTextModel(config, dtype=arch.dtype)
        output = model.apply(model_variables(params, name), ids[:, index].reshape(batch * chunks, width))
        if arch.family == "flux":
            pooled.append(output.pooled_output.reshape(batch, chunks, -1)[:, 0])
            continue
        hidden = text_hidden_state(model, params[name], output, clip_skip=clip_skip + 1,
                                   apply_final_norm=False)
        hidden = prompts.apply_emphasis(hidden.astype(jnp.float32), flat_weights)
        clip_states.append(hidden.reshape(batch, chunks * width, -1))
        pooled.append(output.text_embeds.reshape(batch, chunks, -1)[:, 0])
    pooled = jnp.concatenate(pooled, axis=-1).astype(jnp.float32)
    if arch.family == "flux":
        return {"context": t5_states, "pooled": pooled}
    clip = jnp.concatenate(clip_states, axis=-1)
    if t5_states is None:
        t5_states = jnp.zeros((batch, t5_ids.shape[1], arch.transformer.joint_attention_dim),
                              clip.dtype)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5_states.shape[-1] - clip.shape[-1])))
    return {"context": jnp.concatenate([clip, t5_states.astype(clip.dtype)], axis=1),
            "pooled": pooled}


def sdxl_time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """SDXL's micro-conditioning: original size, crop top-left, target size (no crop, same size)."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (batch, 1))
