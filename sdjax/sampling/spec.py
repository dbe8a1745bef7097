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
    # SD3 / Flux: T5 tokens per prompt (0: the family's default, 256 for SD3 and 512 for Flux, as
    # their diffusers pipelines; Flux.1-schnell was trained with 256).
    max_sequence_length: int = 0
    # Skip-layer guidance (SD3 / SD3.5 MMDiT; diffusers' skip_guidance_layers): while the step index
    # i lies strictly between steps*slg_start and steps*slg_stop, the guided prediction gains
    # slg_scale * (cond - cond with these joint blocks skipped); the scale per image is data.
    slg_layers: tuple[int, ...] = ()
    slg_start: float = 0.01
    slg_stop: float = 0.2

    def validate(self, arch) -> None:
        """Raises ValueError naming the field that `arch` (an Architecture) cannot run."""
        import numpy as np

        from sdjax.diffusion import samplers as samplers_lib

        sampler = samplers_lib.get_sampler(self.sampler, **dict(self.sampler_options))
        if sampler.flow != arch.flow:
            kind = "flow-matching" if arch.flow else "noise-prediction"
            fitting = [n for n in samplers_lib.list_samplers()
                       if samplers_lib.get_sampler(n).flow == arch.flow]
            raise ValueError(f"sampler {self.sampler!r} does not fit this {arch.family} model "
                             f"({kind}); its samplers are: {', '.join(fitting)}")
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
        multiple = int(np.lcm(8, arch.latent_factor * arch.latent_multiple))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
        if self.mode != "txt2img" and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.max_sequence_length < 0:
            raise ValueError(f"max_sequence_length must be >= 0 (0: the model's default), got "
                             f"{self.max_sequence_length}")
        if self.slg_layers:
            if arch.family != "sd3":
                raise ValueError(f"slg_layers (skip-layer guidance) needs an SD3 model, this one is "
                                 f"{arch.family}")
            bad = [k for k in self.slg_layers if not 0 <= k < arch.transformer.num_layers]
            if bad:
                raise ValueError(f"slg_layers {bad} are not joint blocks of this transformer "
                                 f"(0..{arch.transformer.num_layers - 1})")
            if not 0.0 <= self.slg_start < self.slg_stop <= 1.0:
                raise ValueError(f"slg_start/slg_stop must satisfy 0 <= start < stop <= 1, got "
                                 f"{self.slg_start}/{self.slg_stop}")
        if arch.flow:
            if self.controlnets:
                raise ValueError(f"ControlNets for {arch.family} models are not supported")
            if self.clip_skip:
                raise ValueError(f"clip_skip is for the U-Net families; {arch.family} uses its "
                                 f"pipeline's CLIP layers")
            return
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

    def sequence_length(self, arch) -> int:
        """T5 tokens per prompt for a flow-family model."""
        return self.max_sequence_length or {"sd3": 256, "flux": 512}[arch.family]

    @property
    def start_step(self) -> int:
        if self.mode == "txt2img":
            return 0
        from sdjax.diffusion import samplers as samplers_lib

        # The SD3 / Flux pipelines round the start differently; a flow sampler means a flow model.
        flow = samplers_lib.get_sampler(self.sampler, **dict(self.sampler_options)).flow
        return samplers_lib.start_index(self.steps, self.strength, flow=flow)



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
