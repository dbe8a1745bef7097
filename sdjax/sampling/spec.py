"""`SamplingSpec`: the static settings a sampling program is compiled for. Kept free of jax at
import time, so configs can read its defaults (configs/common.py) without pulling in jax."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

MODES = ("txt2img", "img2img", "inpaint")


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """Static settings: changing one of these compiles a new program; everything else (prompts,
    seeds, guidance scales, init images) is data."""
    sampler: str = "dpmpp_2m"
    steps: int = 25
    height: int = 512
    width: int = 512
    sampler_options: tuple[tuple[str, Any], ...] = ()
    mode: str = "txt2img"
    strength: float = 1.0          # img2img / inpaint: fraction of the steps that are run
    guidance: bool = True          # False: conditional branch only (every scale is 1)
    guidance_interval: Optional[tuple[float, float]] = None
    clip_skip: int = 0
    progress: bool = False
    # Images denoised together inside one device's share of the batch. An image's numbers depend on
    # the shapes it is computed with, so a fixed micro-batch makes every image bit-identical
    # whatever the batch size, device count or parallel mode. 1 is exact everywhere; larger values
    # use an accelerator better and stay exact between runs with the same value.
    microbatch: int = 1
    # The ControlNets' configs (`sdjax.models.controlnet.ControlNetConfig`), in the order of
    # params["controlnets"] and the batch's control_image_{k}: the Generator fills them from a
    # request's controls. Their images, scales and start/end are data.
    controlnets: tuple = ()
    guess_mode: bool = False       # ControlNets see the conditional half only (diffusers' guess_mode)

    def validate(self, arch) -> None:
        """Raises ValueError naming the field that `arch` (an Architecture) cannot run."""
        import numpy as np

        from sdjax.diffusion import samplers as samplers_lib

        samplers_lib.get_sampler(self.sampler, **dict(self.sampler_options))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.microbatch < 1:
            raise ValueError(f"microbatch must be >= 1, got {self.microbatch}")
        if self.guidance_interval is not None:
            start, end = self.guidance_interval
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"guidance_interval must be (start, end) with 0 <= start < end <= 1 "
                                 f"(fractions of the sampling progress), got {self.guidance_interval}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        multiple = int(np.lcm(8, arch.latent_factor))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
        if self.mode != "txt2img" and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.mode == "inpaint" and arch.unet.in_channels not in (arch.vae.latent_channels,
                                                                      2 * arch.vae.latent_channels + 1):
            raise ValueError(f"inpainting needs a U-Net with {arch.vae.latent_channels} or "
                             f"{2 * arch.vae.latent_channels + 1} input channels, this one has "
                             f"{arch.unet.in_channels}")
        for k, control in enumerate(self.controlnets):
            _check_controlnet(k, control, arch)
        if self.mode != "inpaint" and arch.unet.in_channels != arch.vae.latent_channels:
            raise ValueError(f"this U-Net takes {arch.unet.in_channels} input channels (an "
                             f"inpainting model): use mode='inpaint' with an init image and a mask")

    @property
    def start_step(self) -> int:
        if self.mode == "txt2img":
            return 0
        from sdjax.diffusion import samplers as samplers_lib

        return samplers_lib.start_index(self.steps, self.strength)



def _check_controlnet(k: int, control, arch) -> None:
    """A ControlNet's residuals must fit the U-Net's skips, and its control image the image size."""
    from sdjax.models.controlnet import config_mismatch

    what = f"controlnet {k}"
    mismatch = config_mismatch(control, arch.unet)
    if mismatch is not None:
        field, ours, theirs = mismatch
        raise ValueError(f"{what} does not fit this U-Net: its {field} is {ours!r}, the U-Net's "
                         f"{theirs!r} (a ControlNet made for another base model?)")
    if control.in_channels != arch.vae.latent_channels:
        raise ValueError(f"{what} takes {control.in_channels} latent channels, the VAE makes "
                         f"{arch.vae.latent_channels}")
    if control.conditioning_factor != arch.latent_factor:
        raise ValueError(f"{what} downsamples its control image {control.conditioning_factor}x, "
                         f"but latents are 1/{arch.latent_factor} of the image size")
