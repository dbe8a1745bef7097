"""The KL autoencoder of latent diffusion (diffusers' `AutoencoderKL`): an encoder from NHWC images in
[-1, 1] to a diagonal Gaussian over latents, and a decoder back. Param names follow diffusers'
module tree with `_i` for list indices, so the converter's table stays short."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sdjax.models.layers import (ATTENTION_IMPLEMENTATIONS, Attention, Downsample, ResnetBlock,
                                 SerializableConfig, Upsample, check_block_types,
                                 check_field_types)

# The reference builds its resnets, mid-block attention and output norms with this epsilon.
_NORM_EPS = 1e-6
# ResnetBlock applies SiLU; diffusers calls the same function "silu" or "swish".
_SUPPORTED_ACTIVATIONS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class VAEConfig(SerializableConfig):
    """diffusers' `AutoencoderKL` config (same field names and defaults), plus sdjax's `attention`."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: Union[int, tuple[int, ...]] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    # Per-channel latent statistics (SDXL-family VAEs such as Playground's); None for SD 1.x/2.x/XL.
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    attention: str = "xla"

    def __post_init__(self):
        check_field_types(self)
        check_block_types(self, down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",))
        if self.act_fn not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"VAEConfig.act_fn: unsupported activation {self.act_fn!r}; "
                             f"only {' / '.join(_SUPPORTED_ACTIVATIONS)}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VAEConfig.norm_num_groups: {self.norm_num_groups} does not divide "
                             f"block_out_channels {self.block_out_channels}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"VAEConfig.attention: unknown implementation {self.attention!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("VAEConfig.latents_mean/latents_std: give both or neither")
        if self.latents_mean is not None:
            if self.shift_factor is not None:
                raise ValueError("VAEConfig.shift_factor: cannot be combined with latents_mean")
            for field in ("latents_mean", "latents_std"):
                if len(getattr(self, field)) != self.latent_channels:
                    raise ValueError(f"VAEConfig.{field}: {len(getattr(self, field))} entries for "
                                     f"{self.latent_channels} latent channels")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "VAEConfig":
        """From an `AutoencoderKL` `config.json` dict. Keys starting with `_` are metadata and
        skipped; any other key sdjax does not know is an error."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"VAEConfig: unknown diffusers config keys: {', '.join(unknown)}")
        return cls.from_dict({k: v for k, v in config.items() if k in fields})


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> the diffusion model's latent space: (z - shift) * scaling_factor, or
    (z - mean) * scaling_factor / std with per-channel statistics (channels last)."""
    if config.latents_mean is not None:
        mean = jnp.asarray(config.latents_mean, z.dtype)
        std = jnp.asarray(config.latents_std, z.dtype)
        return (z - mean) * config.scaling_factor / std
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Inverse of `scale_latents`: the diffusion model's latents -> what `decode` takes."""
    if config.latents_mean is not None:
        mean = jnp.asarray(config.latents_mean, z.dtype)
        std = jnp.asarray(config.latents_std, z.dtype)
        return z * std / config.scaling_factor + mean
    return z / config.scaling_factor + (config.shift_factor or 0.0)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element, NHWC."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split the encoder's 2*latent_channels output; logvar is clipped as the reference does,
        which keeps exp(logvar) finite for untrained or saturated encoders."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> jax.Array:
        """KL(self || other), other defaulting to N(0, I); summed over (H, W, C), one value per
        example, computed in float32."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        if other is None:
            terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
        else:
            o_mean, o_logvar = other.mean.astype(jnp.float32), other.logvar.astype(jnp.float32)
            terms = (jnp.square(mean - o_mean) / jnp.exp(o_logvar) + jnp.exp(logvar - o_logvar)
                     - 1.0 - logvar + o_logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class MidBlockAttention(nn.Module):
    """Single-head self-attention over all H*W positions, pre-GroupNorm, residual."""
    groups: int
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.group_norm = nn.GroupNorm(self.groups, epsilon=_NORM_EPS, **kw)
        self.attend = Attention(1, implementation=self.attention, **kw)
        # The reference keeps to_q..to_out beside group_norm, not in a submodule of their own.
        nn.share_scope(self, self.attend)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.attend(self.group_norm(x).reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution, width unchanged."""
    channels: int
    groups: int
    add_attention: bool = True
    attention: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = lambda name: ResnetBlock(self.channels, groups=self.groups, eps=_NORM_EPS,
                                          name=name, **kw)
        x = resnet("resnets_0")(x)
        if self.add_attention:
            x = MidBlockAttention(self.groups, self.attention, name="attention", **kw)(x)
        return resnet("resnets_1")(x)


class ResnetLevel(nn.Module):
    """One level of the encoder or decoder: `num_layers` resnets, then an optional resampler —
    "down" (stride-2 conv, the reference's DownEncoderBlock2D) or "up" (nearest 2x and a conv,
    UpDecoderBlock2D)."""
    out_channels: int
    num_layers: int
    groups: int
    resample: Optional[str] = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, groups=self.groups, eps=_NORM_EPS,
                            name=f"resnets_{i}", **kw)(x)
        if self.resample == "down":
            # The reference pads bottom/right only, then convolves without padding.
            x = Downsample(self.out_channels, asymmetric_padding=True, name="downsample", **kw)(x)
        elif self.resample == "up":
            x = Upsample(self.out_channels, name="upsample", **kw)(x)
        return x


# Encoder and Decoder run the same parts in opposite orders; these build them for either (parent).
def _conv(parent, features: int, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=parent.dtype,
                   param_dtype=parent.param_dtype, name=name)


def _levels(parent, x: jax.Array, channels: tuple[int, ...], num_layers: int, resample: str,
            prefix: str) -> jax.Array:
    cfg, kw = parent.config, dict(dtype=parent.dtype, param_dtype=parent.param_dtype)
    level = nn.remat(ResnetLevel) if parent.remat else ResnetLevel
    for i, out_channels in enumerate(channels):
        x = level(out_channels, num_layers, cfg.norm_num_groups,
                  resample=resample if i < len(channels) - 1 else None, name=f"{prefix}_{i}",
                  **kw)(x)
    return x


def _mid_block(parent, x: jax.Array) -> jax.Array:
    cfg = parent.config
    block = nn.remat(MidBlock) if parent.remat else MidBlock
    return block(x.shape[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, cfg.attention,
                 dtype=parent.dtype, param_dtype=parent.param_dtype, name="mid_block")(x)


def _output(parent, x: jax.Array, features: int) -> jax.Array:
    x = nn.GroupNorm(parent.config.norm_num_groups, epsilon=_NORM_EPS, dtype=parent.dtype,
                     param_dtype=parent.param_dtype, name="conv_norm_out")(x)
    return _conv(parent, features, "conv_out")(nn.silu(x))


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        x = _conv(self, channels[0], "conv_in")(x)
        x = _levels(self, x, channels, cfg.layers_per_block, "down", "down_blocks")
        return _output(self, _mid_block(self, x), 2 * cfg.latent_channels)


class Decoder(nn.Module):
    """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = _mid_block(self, _conv(self, channels[0], "conv_in")(z))
        # One resnet more per level than the encoder, as in the reference.
        x = _levels(self, x, channels, cfg.layers_per_block + 1, "up", "up_blocks")
        return _output(self, x, cfg.out_channels)


class AutoencoderKL(nn.Module):
    """KL autoencoder. `encode(x)` takes NHWC images in [-1, 1] and returns the posterior;
    `decode(z)` takes unscaled latents (see `unscale_latents`) and returns NHWC images."""
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, remat=self.remat, **kw)
        self.decoder = Decoder(cfg, remat=self.remat, **kw)
        self.quant_conv = (nn.Conv(2 * cfg.latent_channels, (1, 1), **kw)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (nn.Conv(cfg.latent_channels, (1, 1), **kw)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruct `x`: decode a posterior sample when `key` is given, else its mode."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z)
