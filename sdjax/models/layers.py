"""Building blocks shared by the model families: attention, feed-forward, resnet block,
up/down sampling and timestep embeddings. Shapes are NHWC / (batch, length, features)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# Attention implementations selectable by config. "xla" is jax.nn.dot_product_attention's
# portable path; "cudnn" asks for the fused GPU kernel; "reference" is plain einsum + softmax
# in float32, the yardstick for the others.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "reference")


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention core. q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D).

    `mask` is boolean, broadcastable to (B, H, Lq, Lk); True means "may attend".
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if implementation == "reference":
        scale = query.shape[-1] ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                            preferred_element_type=jnp.float32) * scale
        if is_causal:
            lq, lk = query.shape[1], key.shape[1]
            causal = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=is_causal,
        implementation=None if implementation == "xla" else implementation)
