"""`Architecture`: the static description of a loaded model (its configs, noise schedule and
compute dtype), which is what a compiled sampling or training program depends on."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from sdjax.diffusion.schedules import NoiseSchedule
from sdjax.models.clip import CLIPTextConfig
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Hashable, so it can be a static argument of a jitted function."""
    family: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[CLIPTextConfig, ...]
    schedule: NoiseSchedule
    dtype: Any = jnp.float32

    @classmethod
    def of(cls, model, dtype: Any = None) -> "Architecture":
        """From a `Pretrained` (or anything with its family, configs and scheduler config)."""
        return cls(family=model.family, unet=model.unet_config, vae=model.vae_config,
                   text_encoders=tuple(model.text_configs),
                   schedule=NoiseSchedule.from_diffusers(model.scheduler_config),
                   dtype=jnp.dtype(dtype or jnp.float32))

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)
