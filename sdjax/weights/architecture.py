"""`Architecture`: the static description of a loaded model (its configs, noise schedule and
compute dtype), which is what a compiled sampling or training program depends on.

Two kinds of model share it: the U-Net families (sd1, sd2, sdxl: `unet` set, a `NoiseSchedule`)
and the flow-matching transformer families (sd3: MMDiT, flux: Flux; `transformer` set, `unet`
None, a `FlowSchedule`, and a T5 encoder among the text encoders)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from sdjax.diffusion.schedules import FlowSchedule, NoiseSchedule, schedule_from_diffusers
from sdjax.models.flux import FluxTransformer
from sdjax.models.layers import model_variables
from sdjax.models.mmdit import MMDiT
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig

FLOW_FAMILIES = ("sd3", "flux")
# How each flow family's diffusers pipeline picks its base sigmas (FlowSchedule.base_sigmas).
FLOW_BASE_SIGMAS = {"sd3": "scheduler", "flux": "linspace"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Hashable, so it can be a static argument of a jitted function."""
    family: str
    unet: Optional[UNetConfig]
    vae: VAEConfig
    text_encoders: tuple  # CLIPTextConfig, and for the flow families a T5Config
    schedule: NoiseSchedule | FlowSchedule
    dtype: Any = jnp.float32
    transformer: Any = None  # MMDiTConfig (sd3) or FluxConfig (flux)

    @classmethod
    def of(cls, model, dtype: Any = None) -> "Architecture":
        """From a `Pretrained` (or anything with its family, configs and scheduler config)."""
        return cls(family=model.family, unet=model.unet_config, vae=model.vae_config,
                   text_encoders=tuple(model.text_configs),
                   schedule=schedule_from_diffusers(
                       model.scheduler_config, FLOW_BASE_SIGMAS.get(model.family, "scheduler")),
                   dtype=jnp.dtype(dtype or jnp.float32),
                   transformer=getattr(model, "transformer_config", None))

    @property
    def flow(self) -> bool:
        """A flow-matching transformer (SD3, Flux) rather than a noise-predicting U-Net."""
        return self.family in FLOW_FAMILIES

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of this: the transformers cut latents into 2x2 patches."""
        return 2 if self.flow else 1

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)


def transformer_velocity(arch: Architecture, params: dict, x: jax.Array, t, conditioning: dict, *,
                         skip_layers: tuple[int, ...] = (), remat: bool = False) -> jax.Array:
    """The flow families' velocity at NHWC latents x and t = sigma * num_train_timesteps (per image
    or one value), as sampling and training both call the transformer: SD3's MMDiT takes t as it
    is, Flux t / num_train_timesteps (it multiplies by 1000 inside) and the embedded guidance
    (conditioning "guidance", Flux-dev)."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    context = conditioning["context"].astype(arch.dtype)
    pooled = conditioning["pooled"].astype(arch.dtype)
    variables = model_variables(params, "transformer")
    if arch.family == "sd3":
        out = MMDiT(arch.transformer, dtype=arch.dtype, remat=remat).apply(
            variables, x.astype(arch.dtype), t, context, pooled, skip_layers=tuple(skip_layers))
    else:
        out = FluxTransformer(arch.transformer, dtype=arch.dtype, remat=remat).apply(
            variables, x.astype(arch.dtype), t / arch.schedule.num_train_timesteps, context,
            pooled, conditioning.get("guidance"))
    return out.astype(jnp.float32)
