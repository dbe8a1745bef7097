"""ControlNet (Zhang et al. 2023; diffusers' `ControlNetModel`): a trainable copy of the U-Net's
encoder (time embedding, conv_in, down levels, middle block) that also sees a control image through
a small conv stack, and hands the U-Net one residual per skip connection plus one for the middle
block, each through a zero-initialised 1x1 conv. SD 1.x / 2.x / XL from one config.

Param names follow diffusers' module tree (`controlnet_cond_embedding/blocks_0`,
`controlnet_down_blocks_3`, `controlnet_mid_block`), so one renamer serves U-Net and ControlNet.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.layers import Conv2D, ResnetBlock
from sdjax.models.unet import NUM_TIME_IDS, UNetConfig, conv3x3, encoder, time_embedding

CHANNEL_ORDERS = ("rgb", "bgr")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
# ControlNetModel's config has no up path: these U-Net fields mean nothing for it.
_UNET_ONLY_FIELDS = ("up_block_types", "out_channels")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """diffusers' `ControlNetModel` config: the U-Net fields of the encoder it copies plus the
    control image's (`conditioning_channels`, the conditioning embedding's widths, RGB or BGR
    channel order, and `global_pool_conditions` for models trained on pooled residuals)."""
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self):
        if self.mid_block_type == "UNetMidBlock2D":
            # UNetConfig checks the cross-attention middle block; validate the rest as it does.
            object.__setattr__(self, "mid_block_type", "UNetMidBlock2DCrossAttn")
            try:
                super().__post_init__()
            finally:
                object.__setattr__(self, "mid_block_type", "UNetMidBlock2D")
        else:
            super().__post_init__()
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"ControlNetConfig.controlnet_conditioning_channel_order: "
                             f"{self.controlnet_conditioning_channel_order!r} is not one of "
                             f"{', '.join(CHANNEL_ORDERS)}")
        if self.conditioning_channels < 1 or not self.conditioning_embedding_out_channels:
            raise ValueError("ControlNetConfig: conditioning_channels must be >= 1 and "
                             "conditioning_embedding_out_channels non-empty")

    @property
    def num_residuals(self) -> int:
        """Down residuals: conv_in's output, every down layer's and every downsampler's."""
        return 1 + sum(self.layers) + self.num_levels - 1

    @property
    def conditioning_factor(self) -> int:
        """The control image is this many times the latent's height and width."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, attention: str = "xla") -> "ControlNetConfig":
        """From a `ControlNetModel` `config.json` dict (unknown keys are errors, as for U-Nets)."""
        config = {k: v for k, v in config.items() if k not in _UNET_ONLY_FIELDS}
        down = config.get("down_block_types", cls.down_block_types)
        config["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
        return super().from_diffusers(config, attention=attention)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **control: Any) -> "ControlNetConfig":
        """The ControlNet of a U-Net (its encoder's fields), with the control fields given."""
        fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
        return cls(**fields, **control)

    def to_diffusers(self) -> dict:
        """A `ControlNetModel` `config.json` dict (diffusers reads every field back)."""
        out = {k: v for k, v in self.to_dict().items() if k not in _UNET_ONLY_FIELDS
               and k not in ("attention", "sample_size", "dropout")}
        return {"_class_name": "ControlNetModel", **out}


class ConditioningEmbedding(nn.Module):
    """The control image (B, H, W, C) in [0, 1] -> a latent-sized map: conv, then per stage a conv
    and a stride-2 conv, SiLU after each; the last conv starts at zero."""
    config: ControlNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = self.config.conditioning_embedding_out_channels
        x = nn.silu(conv3x3(widths[0], "conv_in", kw)(image))
        for i in range(len(widths) - 1):
            x = nn.silu(conv3x3(widths[i], f"blocks_{2 * i}", kw)(x))
            x = nn.silu(Conv2D(widths[i + 1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                               name=f"blocks_{2 * i + 1}", **kw)(x))
        return Conv2D(self.config.block_out_channels[0], (3, 3), padding=((1, 1), (1, 1)),
                      kernel_init=nn.initializers.zeros, name="conv_out", **kw)(x)


class ResnetMidBlock(nn.Module):
    """diffusers' UNetMidBlock2D without attention layers: one resnet."""
    config: ControlNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, deterministic=True):
        cfg = self.config
        return ResnetBlock(x.shape[-1], groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                           dropout=cfg.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="resnets_0")(x, temb, deterministic)


class ControlNet(nn.Module):
    """(noisy latents, timesteps, text context, control image, conditioning scale[, SDXL added
    conditions]) -> (down residuals, mid residual) for `UNet(..., control=...)`.

    `conditioning_scale` is data: a scalar or one value per image (0 turns the ControlNet off for
    that image without recompiling). `guess_mode` scales the residuals from 0.1 (shallowest) to 1
    (middle block) on a log scale, as diffusers does.
    """
    config: ControlNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 control_image: jax.Array, conditioning_scale: jax.Array = 1.0,
                 added_cond: Optional[Mapping[str, jax.Array]] = None,
                 guess_mode: bool = False, deterministic: bool = True):
        cfg = self.config
        self._check_inputs(sample, encoder_hidden_states, control_image, added_cond)
        batch = sample.shape[0]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            control_image = control_image[..., ::-1]

        temb = time_embedding(cfg, timesteps, added_cond, batch, kw)
        context = encoder_hidden_states.astype(self.dtype)
        x = conv3x3(cfg.block_out_channels[0], "conv_in", kw)(sample.astype(self.dtype))
        x = x + ConditioningEmbedding(cfg, name="controlnet_cond_embedding", **kw)(
            control_image.astype(self.dtype))
        cross_mid = cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
        x, skips = encoder(cfg, x, temb, context, deterministic, self.remat, kw, mid_block=cross_mid)
        if not cross_mid:
            x = ResnetMidBlock(cfg, name="mid_block", **kw)(x, temb, deterministic)

        zero_conv = lambda channels, name: Conv2D(channels, (1, 1), kernel_init=nn.initializers.zeros,
                                                  name=name, **kw)
        outputs = [zero_conv(s.shape[-1], f"controlnet_down_blocks_{i}")(s)
                   for i, s in enumerate(skips)]
        outputs.append(zero_conv(x.shape[-1], "controlnet_mid_block")(x))

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scale = jnp.broadcast_to(scale, (batch,)).reshape(batch, 1, 1, 1)
        if guess_mode and not cfg.global_pool_conditions:
            level_scales = jnp.logspace(-1.0, 0.0, len(outputs), dtype=jnp.float32)
        else:
            level_scales = jnp.ones((len(outputs),), jnp.float32)
        outputs = [(o.astype(jnp.float32) * (scale * level_scales[i])).astype(o.dtype)
                   for i, o in enumerate(outputs)]
        if cfg.global_pool_conditions:
            outputs = [o.mean(axis=(1, 2), keepdims=True) for o in outputs]
        return tuple(outputs[:-1]), outputs[-1]

    @classmethod
    def from_unet(cls, unet: Union[UNetConfig, nn.Module], unet_params: Mapping[str, Any], *,
                  seed: int = 0, **control_fields: Any) -> tuple["ControlNet", dict]:
        """diffusers' `ControlNetModel.from_unet`: (the ControlNet of `unet` (a U-Net config or
        module), its params), every encoder param copied from `unet_params` (same dtype), the
        conditioning embedding's kernels drawn N(0, 1/fan_in) from `seed` but its last conv at zero,
        the zero convs at zero: its residuals start at exactly zero. `control_fields`:
        ControlNetConfig's own fields (conditioning_channels, ...). Params are numpy arrays
        (`sdjax.weights.controlnet.controlnet_from_unet` returns them aligned, as loaded ones)."""
        unet_config = unet.config if isinstance(unet, nn.Module) else unet
        model = cls(ControlNetConfig.from_unet(unet_config, **control_fields))
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(
            model.config)))["params"]
        missing = sorted(name for name in shapes
                         if not name.startswith("controlnet_") and name not in unet_params)
        if missing:
            raise ValueError(f"ControlNet.from_unet: the U-Net params lack {', '.join(missing)} "
                             f"(params of another config?)")
        dtype = np.asarray(unet_params["conv_in"]["kernel"]).dtype
        rng = np.random.default_rng(seed)

        def fresh(path, leaf) -> np.ndarray:
            # Kernels N(0, 1/fan_in), drawn with numpy (tracing flax's init costs seconds of
            # compiling); the conditioning embedding's last conv and every zero conv stay zero.
            names = [p.key for p in path]
            if names[0] != "controlnet_cond_embedding" or names[1] == "conv_out" \
                    or names[-1] != "kernel":
                return np.zeros(leaf.shape, dtype)
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape, np.float32)
                    / np.float32(np.sqrt(fan_in))).astype(dtype)

        own = jax.tree_util.tree_map_with_path(
            fresh, {name: tree for name, tree in shapes.items() if name.startswith("controlnet_")})
        params = from_unet_params(unet_params, {name: own.get(name) for name in shapes})
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
            value = params
            for p in path:
                value = value[p.key]
            if tuple(np.shape(value)) != tuple(leaf.shape):
                raise ValueError(f"ControlNet.from_unet: {'/'.join(p.key for p in path)} is "
                                 f"{tuple(np.shape(value))} in the U-Net params, the ControlNet "
                                 f"needs {tuple(leaf.shape)} (params of another config?)")
        return model, jax.tree.map(lambda x: np.asarray(x, dtype), params)

    def _check_inputs(self, sample, encoder_hidden_states, control_image, added_cond):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"ControlNet: sample must be (B, H, W, {cfg.in_channels}) NHWC, got "
                             f"{sample.shape}")
        want = (sample.shape[0], sample.shape[1] * cfg.conditioning_factor,
                sample.shape[2] * cfg.conditioning_factor, cfg.conditioning_channels)
        if tuple(control_image.shape) != want:
            raise ValueError(f"ControlNet: control_image must be {want} (NHWC, "
                             f"{cfg.conditioning_factor}x the latent size), got "
                             f"{tuple(control_image.shape)}")
        context_shape = encoder_hidden_states.shape
        if len(context_shape) != 3 or context_shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"ControlNet: encoder_hidden_states must be (B, L, "
                             f"{cfg.cross_attention_dim}), got {context_shape}")
        if cfg.addition_embed_type == "text_time":
            if added_cond is None or not {"text_embeds", "time_ids"} <= set(added_cond):
                raise ValueError("ControlNet: addition_embed_type 'text_time' needs added_cond "
                                 "with 'text_embeds' and 'time_ids'")
            shapes = {"text_embeds": (sample.shape[0], cfg.text_embeds_dim),
                      "time_ids": (sample.shape[0], NUM_TIME_IDS)}
            for key, shape in shapes.items():
                if tuple(added_cond[key].shape) != shape:
                    raise ValueError(f"ControlNet: added_cond[{key!r}] must be {shape}, got "
                                     f"{tuple(added_cond[key].shape)}")


def unet_mismatch(unet: UNetConfig, *, block_out_channels, layers, cross_attention_dim,
                  addition_embed_type, text_embeds_dim) -> Optional[tuple[str, Any, Any]]:
    """(what, the ControlNet's value, the U-Net's) for the first way a ControlNet of these values
    cannot feed `unet`, else None: it adds one residual per skip connection and to the middle
    block (widths and layers per level must agree) and sees the U-Net's inputs (context width,
    SDXL's pooled text). `layers` is one int or one per level."""
    if not isinstance(layers, (list, tuple)):
        layers = (layers,) * len(block_out_channels)
    pairs = {"block_out_channels": (tuple(block_out_channels), unet.block_out_channels),
             "layers_per_block": (tuple(layers), unet.layers),
             "cross_attention_dim": (cross_attention_dim, unet.cross_attention_dim),
             "addition_embed_type": (addition_embed_type, unet.addition_embed_type),
             "pooled text embedding width": (text_embeds_dim, unet.text_embeds_dim)}
    return next(((what, ours, theirs) for what, (ours, theirs) in pairs.items()
                 if ours != theirs), None)


def config_mismatch(config: ControlNetConfig, unet: UNetConfig) -> Optional[tuple[str, Any, Any]]:
    """`unet_mismatch` of a ControlNet config."""
    return unet_mismatch(unet, block_out_channels=config.block_out_channels, layers=config.layers,
                         cross_attention_dim=config.cross_attention_dim,
                         addition_embed_type=config.addition_embed_type,
                         text_embeds_dim=config.text_embeds_dim)


def example_inputs(config: ControlNetConfig) -> tuple:
    """The smallest inputs `ControlNet.init` accepts for `config` (params do not depend on sizes)."""
    f = config.downsample_factor
    size = f * config.conditioning_factor
    inputs = (jnp.zeros((1, f, f, config.in_channels)), jnp.zeros((1,)),
              jnp.zeros((1, 1, config.cross_attention_dim)),
              jnp.zeros((1, size, size, config.conditioning_channels)), 1.0)
    if config.addition_embed_type == "text_time":
        return inputs + ({"text_embeds": jnp.zeros((1, config.text_embeds_dim)),
                          "time_ids": jnp.zeros((1, NUM_TIME_IDS))},)
    return inputs


def from_unet_params(unet_params: Mapping[str, Any], controlnet_params: Mapping[str, Any]) -> dict:
    """ControlNet params starting from a U-Net's, as the original recipe trains them: every encoder
    param copied from the U-Net, the control-only ones (conditioning embedding, zero convs) kept
    from `controlnet_params` (a fresh init: zero convs at zero)."""
    out = {}
    for name, value in controlnet_params.items():
        out[name] = unet_params[name] if name in unet_params else value
    return out
