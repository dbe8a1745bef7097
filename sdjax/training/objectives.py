"""Training objectives: pure functions of arrays and PRNG keys, model-agnostic.

Latent diffusion (DDPM noising, eps / v / x0 targets, min-SNR weighting, offset noise, caption
dropout), rectified flow matching (SD3, Flux), the KL autoencoder's loss, and CLIP's contrastive
loss. Images/latents are NHWC; every loss is computed in float32 whatever the prediction's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
RECONSTRUCTION_LOSSES = ("l1", "l2")
# CLIP clamps its learnable temperature so logits never exceed 100 x cosine (Radford et al. 2021).
MAX_LOGIT_SCALE = math.log(100.0)


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) so it broadcasts over an NHWC batch of rank `ndim`."""
    return values.reshape(values.shape[:1] + (1,) * (ndim - 1))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


# v-parameterisation v = sqrt(ac) eps - sqrt(1 - ac) x0 (Salimans & Ho 2022, sec. 4).
def velocity(x0: jax.Array, noise: jax.Array, timesteps: jax.Array,
             alphas_cumprod: jax.Array) -> jax.Array:
    ac = _per_example(jnp.asarray(alphas_cumprod, jnp.float32)[timesteps], x0.ndim)
    v = jnp.sqrt(ac) * noise.astype(jnp.float32) - jnp.sqrt(1.0 - ac) * x0.astype(jnp.float32)
    return v.astype(x0.dtype)


def diffusion_target(x0: jax.Array, noise: jax.Array, timesteps: jax.Array,
                     alphas_cumprod: jax.Array, prediction_type: str) -> jax.Array:
    """What the model is trained to output: the noise, the velocity, or the clean sample."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, timesteps, alphas_cumprod)
    return x0


# Signal-to-noise ratio ac / (1 - ac) of the noised sample (Kingma et al. 2021, eq. 1).
def snr(timesteps: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
    ac = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    return ac / (1.0 - ac)


# Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
# Weighting Strategy", eq. 9 and its eps / v forms).
def min_snr_weights(snr_values: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Weights per example on the MSE of each target so that all equal min(snr, gamma) x the
    MSE in x0 space. eps: min(snr, g)/snr, v: min(snr, g)/(snr + 1), sample: min(snr, g)."""
    _check_prediction_type(prediction_type)
    clipped = jnp.minimum(snr_values, gamma)
    if prediction_type == "epsilon":
        # snr -> 0 (a zero-terminal-SNR schedule's last step): the ratio's limit is 1, not 0/0.
        return jnp.where(snr_values > 0, clipped / jnp.where(snr_values > 0, snr_values, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped


def diffusion_loss(prediction: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array,
                   alphas_cumprod: jax.Array, prediction_type: str,
                   snr_gamma: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
    """MSE between the prediction and its target, averaged per example over (H, W, C), optionally
    min-SNR-gamma weighted. Returns (mean over the batch, per-example losses (B,))."""
    target = diffusion_target(x0, noise, timesteps, alphas_cumprod, prediction_type)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} != target shape {target.shape}")
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights(snr(timesteps, alphas_cumprod), snr_gamma,
                                                    prediction_type)
    return jnp.mean(per_example), per_example


# Rectified flow matching (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow Transformers",
# eq. 1-3): x_t = (1 - t) x0 + t noise moves at the velocity noise - x0, which the model predicts
# (diffusers' train_dreambooth_sd3.py / train_dreambooth_flux.py, precondition_outputs off).
def flow_matching_loss(prediction: jax.Array, x0: jax.Array, noise: jax.Array,
                       weighting: jax.Array) -> tuple[jax.Array, jax.Array]:
    """weighting (B,) x the MSE between the predicted and the true velocity, averaged per example
    over (H, W, C). Returns (mean over the batch, per-example losses (B,))."""
    target = noise.astype(jnp.float32) - x0.astype(jnp.float32)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} != target shape {target.shape}")
    err = _per_example(weighting.astype(jnp.float32), target.ndim) * jnp.square(
        prediction.astype(jnp.float32) - target)
    per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return jnp.mean(per_example), per_example


# Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): a per-image, per-channel constant
# added to the noise lets the model shift an image's mean brightness, which plain noise hides.
def offset_noise(key: jax.Array, shape: tuple[int, ...], strength: float,
                 dtype=jnp.float32) -> jax.Array:
    """N(0, 1) noise of `shape` (NHWC) plus strength * N(0, 1) per (image, channel)."""
    noise_key, offset_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    offset = jax.random.normal(offset_key, (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],),
                               jnp.float32)
    return (noise + strength * offset).astype(dtype)


# Uniform training timesteps t ~ U{0, ..., T-1} (Ho et al. 2020, Algorithm 1).
def sample_timesteps(key: jax.Array, batch: int, num_train_timesteps: int) -> jax.Array:
    return jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)


# Caption dropout for classifier-free guidance (Ho & Salimans 2022, sec. 3.2): the model also learns
# the unconditional prediction from the empty prompt.
def caption_dropout(key: jax.Array, token_ids: jax.Array, empty_ids: jax.Array,
                    p: float) -> jax.Array:
    """Replace each row of `token_ids` (B, L, ...) by `empty_ids` (L, ...) with probability p.

    Works on ids or on already computed embeddings alike (anything with a leading batch axis)."""
    empty_ids = jnp.asarray(empty_ids, token_ids.dtype)
    if empty_ids.shape != token_ids.shape[1:]:
        raise ValueError(f"empty_ids shape {empty_ids.shape} != one row of token_ids "
                         f"{token_ids.shape[1:]}")
    drop = jax.random.uniform(key, token_ids.shape[:1]) < p
    return jnp.where(_per_example(drop, token_ids.ndim), empty_ids[None], token_ids)


# KL autoencoder objective (Rombach et al. 2022, appendix G; Kingma & Welling 2014, eq. 10): a
# pixel reconstruction term plus beta x KL(N(mean, exp(logvar)) || N(0, I)). The perceptual and
# adversarial terms of the full recipe take a discriminator/LPIPS net and live with the train step.
def vae_loss(reconstruction: jax.Array, target: jax.Array, posterior_mean: jax.Array,
             posterior_logvar: jax.Array, kl_weight: float,
             reconstruction_loss: str = "l1") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction error (mean over every element) + kl_weight x KL (summed over the latent's
    (H, W, C), averaged over the batch). Returns (loss, {"loss", "reconstruction", "kl"})."""
    if reconstruction_loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"reconstruction_loss {reconstruction_loss!r} is not one of "
                         f"{RECONSTRUCTION_LOSSES}")
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction shape {reconstruction.shape} != target shape {target.shape}")
    diff = reconstruction.astype(jnp.float32) - target.astype(jnp.float32)
    rec = jnp.mean(jnp.abs(diff) if reconstruction_loss == "l1" else jnp.square(diff))
    mean = posterior_mean.astype(jnp.float32)
    logvar = posterior_logvar.astype(jnp.float32)
    kl_terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
    kl = jnp.mean(0.5 * jnp.sum(kl_terms.reshape(kl_terms.shape[0], -1), axis=1))
    loss = rec + kl_weight * kl
    return loss, {"loss": loss, "reconstruction": rec, "kl": kl}


# CLIP's symmetric InfoNCE loss (Radford et al. 2021, Figure 3), temperature learnt as log scale.
def clip_contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array,
                          logit_scale: jax.Array, negative_text_embeds: Optional[jax.Array] = None,
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of text->image and image->text over the batch, matching pairs on the diagonal.

    `negative_text_embeds` (B, K, D): extra captions that match no image (hard negatives, as in
    NegCLIP); every image is scored against them too, so image->text must tell its caption from
    captions that differ in one detail. Text->image is unchanged.

    `logit_scale` is the log of the inverse temperature; it is clamped at log(100) here (so it gets
    no gradient beyond), where CLIP clamps the parameter after each step. Returns (loss, metrics)
    with metrics "loss", "accuracy" (mean of both directions' top-1), "text_to_image_accuracy",
    "image_to_text_accuracy", "logit_scale" (the applied exp scale)."""
    if text_embeds.shape != image_embeds.shape:
        raise ValueError(f"text_embeds shape {text_embeds.shape} != image_embeds shape "
                         f"{image_embeds.shape}")
    text = text_embeds.astype(jnp.float32)
    image = image_embeds.astype(jnp.float32)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), MAX_LOGIT_SCALE))
    logits_per_text = scale * text @ image.T
    logits_per_image = logits_per_text.T
    if negative_text_embeds is not None:
        if negative_text_embeds.ndim != 3 or negative_text_embeds.shape[0] != text.shape[0]:
            raise ValueError(f"negative_text_embeds shape {negative_text_embeds.shape}: expected "
                             f"({text.shape[0]}, K, {text.shape[1]})")
        negatives = negative_text_embeds.reshape(-1, text.shape[1]).astype(jnp.float32)
        negatives = negatives / jnp.linalg.norm(negatives, axis=-1, keepdims=True)
        logits_per_image = jnp.concatenate([logits_per_image, scale * image @ negatives.T], 1)
    labels = jnp.arange(text.shape[0])

    def cross_entropy(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                                             labels[:, None], axis=-1))

    text_loss = cross_entropy(logits_per_text)
    image_loss = cross_entropy(logits_per_image)
    loss = 0.5 * (text_loss + image_loss)
    t2i = jnp.mean(jnp.argmax(logits_per_text, axis=1) == labels)
    i2t = jnp.mean(jnp.argmax(logits_per_image, axis=1) == labels)
    return loss, {"loss": loss, "accuracy": 0.5 * (t2i + i2t), "text_to_image_accuracy": t2i,
                  "image_to_text_accuracy": i2t, "logit_scale": scale}
