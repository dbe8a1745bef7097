"""The rectified-flow objective of the flow-matching transformers (SD3 / SD3.5 MMDiT, Flux.1), as
diffusers' `train_dreambooth_sd3.py` and `train_dreambooth_flux.py` train them (the
`precondition_outputs=False` path): latents scaled with the 16-channel VAE's shift and scale,
training draws u from `compute_density_for_timestep_sampling` (logit-normal, mode or uniform),
sigma and timestep from the scheduler's table at int(u * T), x_t = (1 - sigma) x0 + sigma noise,
the transformer's velocity against noise - x0, each example's squared error weighted by
`compute_loss_weighting_for_sd3` (sigma_sqrt, cosmap or none) and averaged.

The text conditioning is sampling's (`text.conditioning.encode_text`: CLIP ids and T5 ids, no
emphasis), the transformer is called with the inputs the sampling program gives it (SD3 takes
t = sigma * 1000, Flux t / 1000 and, for Flux-dev, the embedded guidance, here the constant
training value `guidance` as diffusers' `--guidance_scale`).

A step's key is split into (VAE posterior sample, caption dropout, noise, timestep draw); one
caption-dropout draw drops an example's CLIP and T5 ids together.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion.schedules import (DENSITY_SCHEMES, compute_density_for_timestep_sampling,
                                       compute_loss_weighting_for_sd3, flow_add_noise,
                                       flow_training_levels)
from sdjax.text.conditioning import encode_text
from sdjax.text.t5_tokenizer import T5Tokenizer
from sdjax.training import objectives
from sdjax.training.step import training_latents
from sdjax.weights.architecture import Architecture, transformer_velocity

# T5 tokens per caption when the config gives none: the `--max_sequence_length` defaults of
# diffusers' train_dreambooth_sd3.py and train_dreambooth_flux.py.
TRAINING_SEQUENCE_LENGTHS = {"sd3": 77, "flux": 512}


def sequence_length(family: str, max_sequence_length: int = 0) -> int:
    """T5 tokens per training caption: `max_sequence_length`, or the family's training default."""
    if max_sequence_length < 0:
        raise ValueError(f"flow.max_sequence_length must be >= 0 (0: the family's default), got "
                         f"{max_sequence_length}")
    return max_sequence_length or TRAINING_SEQUENCE_LENGTHS[family]


def flow_tokenizer(tokenizers: Sequence, length: int) -> Callable[[list[str]], dict]:
    """captions -> {"input_ids": (B, CLIP encoders, 1 chunk, 77), "t5_ids": (B, length)}: what
    the data pipeline hands the flow objective. A model without a T5 encoder (SD3 saved without
    it) gets zero ids, as sampling gives it (its T5 states are zeros whatever they are)."""
    clip = [t for t in tokenizers if not isinstance(t, T5Tokenizer)]
    t5 = next((t for t in tokenizers if isinstance(t, T5Tokenizer)), None)

    def tokenize(captions):
        ids = np.stack([t(captions) for t in clip], axis=1)[:, :, None]
        t5_ids = (np.zeros((len(captions), length), np.int32) if t5 is None
                  else np.asarray(t5(captions, length), np.int32))
        return {"input_ids": ids, "t5_ids": t5_ids}

    return tokenize


@dataclasses.dataclass(frozen=True, eq=False)
class FlowTask:
    """Rectified-flow objective of one SD3 or Flux architecture (`arch.dtype` is the compute
    dtype). `empty_ids` (CLIP encoders, 1, 77) and `empty_t5_ids` (L,): the empty caption, which
    caption dropout substitutes. `weighting_scheme` picks both the timestep density and the loss
    weighting, as in diffusers' scripts (`logit_normal` with logit_mean / logit_std, `mode` with
    mode_scale, `uniform`; `sigma_sqrt`, `cosmap`, `none` draw uniformly and weight the loss)."""
    arch: Architecture
    empty_ids: np.ndarray
    empty_t5_ids: np.ndarray
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 3.5
    caption_dropout: float = 0.0
    remat: bool = False

    prediction_type = "flow"

    @property
    def dtype(self):
        return self.arch.dtype

    def __post_init__(self):
        if not self.arch.flow:
            raise ValueError(f"the flow objective trains SD3 and Flux transformers, not a "
                             f"{self.arch.family} U-Net (use the ldm objective)")
        if self.weighting_scheme not in DENSITY_SCHEMES:
            raise ValueError(f"flow.weighting_scheme {self.weighting_scheme!r} is not one of "
                             f"{DENSITY_SCHEMES}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")

    def loss(self, params: dict, batch: dict, key: jax.Array):
        """batch: "pixels" (B, H, W, 3) in [-1, 1] or "latents" (B, h, w, 16) unscaled VAE latents;
        "input_ids" (B, CLIP encoders, 1, 77) and "t5_ids" (B, L). Adapters in
        params[ADAPTERS_KEY] (LoRA training) reach the transformer and the text encoders."""
        arch = self.arch
        latent_key, drop_key, noise_key, time_key = jax.random.split(key, 4)
        x0 = training_latents(arch, params, batch, latent_key)
        b = x0.shape[0]

        # One draw per example drops its CLIP and T5 ids together.
        ids = objectives.caption_dropout(drop_key, batch["input_ids"], self.empty_ids,
                                         self.caption_dropout)
        t5_ids = objectives.caption_dropout(drop_key, batch["t5_ids"], self.empty_t5_ids,
                                            self.caption_dropout)
        cond = encode_text(arch, params, ids, jnp.ones((b,) + ids.shape[2:], jnp.float32), 0,
                           t5_ids, jnp.ones(t5_ids.shape, jnp.float32))

        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        u = compute_density_for_timestep_sampling(time_key, self.weighting_scheme, b,
                                                  self.logit_mean, self.logit_std, self.mode_scale)
        timesteps, sigmas = flow_training_levels(arch.schedule, u)
        noisy = flow_add_noise(x0, noise, sigmas)
        velocity = self.transformer(params, noisy, timesteps, cond)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        loss, _ = objectives.flow_matching_loss(velocity, x0, noise, weighting)
        return loss, {}

    def transformer(self, params: dict, x: jax.Array, timesteps: jax.Array, cond: dict
                    ) -> jax.Array:
        """The velocity the transformer predicts at x (NHWC) and timesteps = sigma * T, called as
        sampling calls it (`weights.architecture.transformer_velocity`), with `remat` and, for
        Flux-dev, the training guidance."""
        if self.arch.family == "flux" and self.arch.transformer.guidance_embeds:
            cond = {**cond, "guidance": jnp.full((x.shape[0],), self.guidance, jnp.float32)}
        return transformer_velocity(self.arch, params, x, timesteps, cond, remat=self.remat)


def flow_task(arch: Architecture, tokenize: Callable[[list[str]], dict], settings: dict,
              remat: bool = False) -> FlowTask:
    """The FlowTask of a run: `settings` are the config's `flow` fields (weighting_scheme,
    logit_mean, logit_std, mode_scale, guidance, caption_dropout; max_sequence_length is the
    tokenizer's, read by `sequence_length`)."""
    known = {f.name for f in dataclasses.fields(FlowTask)} - {"arch", "empty_ids", "empty_t5_ids",
                                                             "remat"}
    unknown = sorted(set(settings) - known - {"max_sequence_length"})
    if unknown:
        raise ValueError(f"flow: unknown settings {unknown}; known: "
                         f"{sorted(known | {'max_sequence_length'})}")
    empty = tokenize([""])
    return FlowTask(arch, empty_ids=empty["input_ids"][0], empty_t5_ids=empty["t5_ids"][0],
                    remat=remat, **{k: v for k, v in settings.items() if k in known})


__all__ = ["FlowTask", "TRAINING_SEQUENCE_LENGTHS", "flow_task", "flow_tokenizer",
           "sequence_length"]
