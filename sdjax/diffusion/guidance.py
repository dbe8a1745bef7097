"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a model function.

The wrapped model sees one batch [uncond; cond] per call, so the U-Net runs once per evaluation.
The scale is an array with one entry per image, so one compiled program can sweep scales.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

# model_fn(x, t, context) -> prediction; `context` is whatever conditioning pytree the model takes
# (text embeddings, SDXL's pooled embeddings and time ids), batched along axis 0.
ConditionedModel = Callable[[jax.Array, jax.Array, Any], jax.Array]


def guidance_combine(uncond: jax.Array, cond: jax.Array, scale: jax.Array,
                     rescale: jax.Array | float = 0.0) -> jax.Array:
    """uncond + scale·(cond − uncond), then guidance rescale φ (Lin et al. 2023, §3.4):
    match the per-image std of the guided prediction to the conditional one, mixed by φ."""
    scale = _per_image(scale, cond)
    guided = uncond + scale * (cond - uncond)
    rescale = _per_image(rescale, cond)
    axes = tuple(range(1, cond.ndim))
    # ddof=1: the reference uses the unbiased estimate.
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return jnp.where(rescale > 0, rescale * rescaled + (1 - rescale) * guided, guided)


def classifier_free_guidance(
    model_fn: ConditionedModel,
    cond: Any,
    uncond: Optional[Any],
    scale: jax.Array,
    *,
    rescale: jax.Array | float = 0.0,
    interval: Optional[tuple[float, float]] = None,
    num_train_timesteps: int = 1000,
    after: Optional[Callable[..., jax.Array]] = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wrap `model_fn` into `fn(x, t, **model_kwargs) -> guided prediction` (keyword arguments
    go through to `model_fn`).

    Args:
      cond / uncond: conditioning pytrees (batch B). `uncond=None` means no guidance at all: one
        conditional call per evaluation, as when the scale is 1 for every image.
      scale: (B,) or scalar guidance scale.
      rescale: guidance rescale φ in [0, 1], (B,) or scalar.
      interval: apply guidance only while the denoising progress 1 − t/T lies in [start, end]
        (Kynkäänniemi et al. 2024); outside it the conditional prediction is used.
      after: `after(guided, pred_cond, x, t, **model_kwargs) -> guided` adds a further guidance
        term that needs the conditional prediction (skip-layer guidance, `skip_layer_term`).
    """
    if uncond is None:
        return lambda x, t, **model_kwargs: model_fn(x, t, cond, **model_kwargs)

    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

    def guided(x: jax.Array, t: jax.Array, **model_kwargs) -> jax.Array:
        t = jnp.asarray(t)
        t_both = jnp.concatenate([t, t], axis=0) if t.ndim else t
        prediction = model_fn(jnp.concatenate([x, x], axis=0), t_both, both, **model_kwargs)
        pred_uncond, pred_cond = jnp.split(prediction, 2, axis=0)
        out = guidance_combine(pred_uncond, pred_cond, scale, rescale)
        if interval is not None:
            progress = 1.0 - t.astype(jnp.float32) / num_train_timesteps
            inside = (progress >= interval[0]) & (progress <= interval[1])
            out = jnp.where(_per_image(inside, pred_cond), out, pred_cond)
        if after is not None:
            out = after(out, pred_cond, x, t, **model_kwargs)
        return out

    return guided


def skip_layer_term(guided: jax.Array, pred_cond: jax.Array, pred_skipped: jax.Array,
                    scale: jax.Array) -> jax.Array:
    """Skip-layer guidance (SD3.5; diffusers' StableDiffusion3Pipeline): push the guided prediction
    away from the conditional prediction of the same model with some blocks skipped,
    guided + scale·(cond − cond_skipped), scale per image."""
    return guided + _per_image(scale, guided) * (pred_cond - pred_skipped)


def _per_image(value, like: jax.Array) -> jax.Array:
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if value.ndim else value
