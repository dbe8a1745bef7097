"""The conditional U-Net of latent diffusion (diffusers' `UNet2DConditionModel`): SD 1.x, SD 2.x and
SDXL from one config. NHWC throughout; param names follow diffusers' module tree with `_i` for
list indices (`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q`), so the converter stays
short."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models import layers
from sdjax.models.layers import (ATTENTION_IMPLEMENTATIONS, Conv2D, Dense, Downsample,
                                 GEGLUFeedForward, ResnetBlock, SerializableConfig, TimestepEmbedding, Upsample,
                                 check_block_types, check_field_types, lists_to_tuples,
                                 timestep_embedding)

IntOrTuple = Union[int, tuple[int, ...]]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
# ResnetBlock applies SiLU; diffusers calls the same function "silu" or "swish".
_SUPPORTED_ACTIVATIONS = ("silu", "swish")

# diffusers config fields that sdjax does not model: each is accepted only at the value(s) listed,
# which are the ones SD 1.x / 2.x / XL use (mostly diffusers' defaults).
_REFERENCE_ONLY_FIELDS: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# SDXL's micro-conditioning `time_ids`: original size (2), crop top-left (2), target size (2).
NUM_TIME_IDS = 6

_FLAG_FIELDS = ("flip_sin_to_cos", "use_linear_projection", "upcast_attention")
# Read by diffusers only for addition_embed_type "text"/"text_image", which sdjax rejects anyway.
_IGNORED_FIELDS = ("addition_embed_type_num_heads",)


@dataclasses.dataclass(frozen=True)
class UNetConfig(SerializableConfig):
    """diffusers' `UNet2DConditionModel` config (same field names, defaults and meanings), restricted
    to what SD 1.x / 2.x / XL use, plus sdjax's `attention` implementation.

    Heads: as in diffusers, the head COUNT per level is `num_attention_heads or attention_head_dim`
    (the historical misnomer: SD 1.x's `attention_head_dim=8` means 8 heads), and the head width is
    the level's channels // heads. Per-level fields take an int (all levels) or a tuple.
    """
    sample_size: Optional[IntOrTuple] = None
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    use_linear_projection: bool = False
    # Kept for round-trips: sdjax's attention always takes logits and softmax in float32.
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    attention: str = "xla"

    def __post_init__(self):
        check_field_types(self)
        check_block_types(self, down_block_types=DOWN_BLOCK_TYPES, up_block_types=UP_BLOCK_TYPES)
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"UNetConfig.mid_block_type: unsupported {self.mid_block_type!r}; "
                             f"only {', '.join(MID_BLOCK_TYPES)}")
        for field in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                      "num_attention_heads"):
            value = getattr(self, field)
            if isinstance(value, tuple):
                if len(value) != self.num_levels:
                    raise ValueError(f"UNetConfig.{field}: {len(value)} entries, but "
                                     f"block_out_channels has {self.num_levels}")
                if not all(isinstance(v, int) for v in value):
                    raise ValueError(f"UNetConfig.{field}: entries must be ints, got {value!r}")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"UNetConfig.cross_attention_dim: must be one int, got "
                             f"{self.cross_attention_dim!r}")
        if self.act_fn not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"UNetConfig.act_fn: unsupported activation {self.act_fn!r}; "
                             f"only {' / '.join(_SUPPORTED_ACTIVATIONS)}")
        if self.resnet_time_scale_shift != "default":
            raise ValueError(f"UNetConfig.resnet_time_scale_shift: unsupported "
                             f"{self.resnet_time_scale_shift!r}; only 'default'")
        if not isinstance(self.norm_num_groups, int) or self.norm_num_groups < 1:
            raise ValueError(f"UNetConfig.norm_num_groups: must be a positive int, got "
                             f"{self.norm_num_groups!r}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"UNetConfig.norm_num_groups: {self.norm_num_groups} does not divide "
                             f"block_out_channels {self.block_out_channels}")
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads)):
            if not 1 <= heads <= channels:
                raise ValueError(f"UNetConfig: level {level} has {heads} attention heads for "
                                 f"{channels} channels")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig.addition_embed_type: unsupported "
                             f"{self.addition_embed_type!r}; only None or 'text_time' (SDXL)")
        if self.addition_embed_type == "text_time":
            for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(self, field) is None:
                    raise ValueError(f"UNetConfig.{field}: required by addition_embed_type "
                                     f"'text_time'")
            if self.text_embeds_dim <= 0:
                raise ValueError(
                    f"UNetConfig.projection_class_embeddings_input_dim: "
                    f"{self.projection_class_embeddings_input_dim} leaves no room for text embeds "
                    f"beside {NUM_TIME_IDS} time ids of width {self.addition_time_embed_dim}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"UNetConfig.attention: unknown implementation {self.attention!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")

    # Per-level views, resolved the way diffusers' UNet2DConditionModel.__init__ resolves them.

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def _per_level(self, value: IntOrTuple) -> tuple[int, ...]:
        return value if isinstance(value, tuple) else (value,) * self.num_levels

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention head count per level (diffusers: `num_attention_heads or attention_head_dim`)."""
        return self._per_level(self.num_attention_heads or self.attention_head_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._per_level(self.layers_per_block)

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        return self._per_level(self.transformer_layers_per_block)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def text_embeds_dim(self) -> int:
        """Width of SDXL's pooled text embedding in `added_cond['text_embeds']` (0 without it)."""
        if self.addition_embed_type != "text_time":
            return 0
        time_width = NUM_TIME_IDS * self.addition_time_embed_dim
        return self.projection_class_embeddings_input_dim - time_width

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (self.num_levels - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, attention: str = "xla") -> "UNetConfig":
        """From a `UNet2DConditionModel` `config.json` dict. Keys starting with `_` are metadata;
        a reference-only field at a value sdjax does not implement, or an unknown key, is an error."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention"}
        kwargs: dict[str, Any] = {"attention": attention}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_FIELDS:
                continue
            if key in fields:
                # Some released configs write null for a false flag (SDXL: upcast_attention).
                kwargs[key] = (False if value is None and key in _FLAG_FIELDS
                               else lists_to_tuples(value))
            elif key in _REFERENCE_ONLY_FIELDS:
                allowed = _REFERENCE_ONLY_FIELDS[key]
                # only_cross_attention may be given per level.
                values = value if isinstance(value, list) else [value]
                if not all(v in allowed for v in values):
                    raise ValueError(f"UNetConfig: unsupported diffusers config value "
                                     f"{key}={value!r} (sdjax implements only "
                                     f"{' / '.join(map(repr, allowed))})")
            else:
                raise ValueError(f"UNetConfig: unknown diffusers config field {key}={value!r}")
        # diffusers accepts a per-level list for cross_attention_dim, but every level sees the same
        # encoder_hidden_states, so only equal entries can work.
        cross = kwargs.get("cross_attention_dim")
        if isinstance(cross, tuple):
            if len(set(cross)) != 1:
                raise ValueError(f"UNetConfig: unsupported diffusers config value "
                                 f"cross_attention_dim={list(cross)!r} (levels must agree)")
            kwargs["cross_attention_dim"] = cross[0]
        return cls(**kwargs)


# The transformer blocks' attention, as diffusers': to_q/to_k/to_v without bias, to_out with it.
Attention = functools.partial(layers.Attention, use_bias=(False, False, False, True))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: pre-LayerNorm self-attention, cross-attention on the
    context, GEGLU feed-forward, each with a residual."""
    heads: int
    head_dim: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        attention = lambda name: Attention(self.heads, self.head_dim, dim,
                                           implementation=self.implementation, dtype=self.dtype,
                                           param_dtype=self.param_dtype, name=name)
        x = x + attention("attn1")(norm("norm1")(x))
        x = x + attention("attn2")(norm("norm2")(x), context)
        return x + GEGLUFeedForward(4 * dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel on NHWC maps: GroupNorm -> proj_in -> transformer blocks over
    the H*W tokens -> proj_out, plus the input.

    proj_in/proj_out are dense layers whatever `use_linear_projection` says: on NHWC a 1x1 conv is
    the same matmul, and the converter reshapes SD 1.x's 1x1 conv kernels to dense ones.
    """
    heads: int
    depth: int
    groups: int
    implementation: str = "xla"
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        # diffusers allows heads that do not divide the width; the blocks then run at heads*head_dim.
        head_dim = c // self.heads
        inner = self.heads * head_dim
        y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="norm")(x)
        y = Dense(inner, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj_in")(y.reshape(b, h * w, c))
        block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        for i in range(self.depth):
            y = block(self.heads, head_dim, implementation=self.implementation,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"transformer_blocks_{i}")(y, context)
        y = Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_out")(y)
        return x + y.reshape(b, h, w, c)


class UNetLevel(nn.Module):
    """One down or up level: `num_layers` resnets, each followed by a spatial transformer when
    `cross_attention`, then the level's down- or upsampler.

    Down levels return (x, outputs of every layer and of the downsampler) for the skips; up levels
    take those skips, concatenating one onto the channels before each resnet.
    """
    config: UNetConfig
    out_channels: int
    num_layers: int
    heads: int
    depth: int
    cross_attention: bool
    up: bool
    resample: bool
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, skips=(), deterministic=True, upsample_size=None):
        outputs = []
        for i in range(self.num_layers):
            if self.up:
                x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = _resnet(self, self.out_channels, f"resnets_{i}")(x, temb, deterministic)
            if self.cross_attention:
                x = _spatial_transformer(self, self.heads, self.depth, f"attentions_{i}")(x, context)
            outputs.append(x)
        if self.resample and self.up:
            x = Upsample(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="upsample")(x, upsample_size)
        elif self.resample:
            x = Downsample(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="downsample")(x)
            outputs.append(x)
        return x, tuple(outputs)


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, then (spatial transformer, resnet)."""
    config: UNetConfig
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True):
        cfg = self.config
        x = _resnet(self, x.shape[-1], "resnets_0")(x, temb, deterministic)
        x = _spatial_transformer(self, cfg.heads[-1], cfg.transformer_depths[-1],
                                 "attentions_0")(x, context)
        return _resnet(self, x.shape[-1], "resnets_1")(x, temb, deterministic)


def _resnet(parent, channels: int, name: str) -> ResnetBlock:
    cfg = parent.config
    # deterministic (argument 3, counting self) is a Python bool: static under remat.
    cls = nn.remat(ResnetBlock, static_argnums=(3,)) if parent.remat else ResnetBlock
    return cls(channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
               dtype=parent.dtype, param_dtype=parent.param_dtype, name=name)


def _spatial_transformer(parent, heads: int, depth: int, name: str) -> SpatialTransformer:
    cfg = parent.config
    return SpatialTransformer(heads, depth, cfg.norm_num_groups, implementation=cfg.attention,
                              remat=parent.remat, dtype=parent.dtype,
                              param_dtype=parent.param_dtype, name=name)


def conv3x3(features: int, name: str, kw: dict) -> Conv2D:
    return Conv2D(features, (3, 3), padding=((1, 1), (1, 1)), name=name, **kw)


def time_embedding(cfg: UNetConfig, timesteps, added_cond, batch: int, kw: dict) -> jax.Array:
    """The timestep embedding (plus SDXL's added text-time embedding), built inside the calling
    module as `time_embedding` (and `add_embedding`): the U-Net's and a ControlNet's are the same."""
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0],
                               flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(
        t_emb.astype(kw["dtype"]))
    if cfg.addition_embed_type == "text_time":
        time_ids = added_cond["time_ids"]
        time_emb = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                      flip_sin_to_cos=cfg.flip_sin_to_cos,
                                      freq_shift=cfg.freq_shift).reshape(batch, -1)
        add = jnp.concatenate([added_cond["text_embeds"].astype(jnp.float32), time_emb], -1)
        temb = temb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(
            add.astype(kw["dtype"]))
    return temb


def encoder(cfg: UNetConfig, x, temb, context, deterministic: bool, remat: bool, kw: dict,
            mid_block: bool = True):
    """The down levels and the middle block after conv_in, built inside the calling module (the
    U-Net and the ControlNet share them): returns (middle output, skips incl. conv_in's output)."""
    skips = [x]
    for i, block_type in enumerate(cfg.down_block_types):
        x, outputs = UNetLevel(
            cfg, cfg.block_out_channels[i], cfg.layers[i], cfg.heads[i],
            cfg.transformer_depths[i], cross_attention=block_type == "CrossAttnDownBlock2D",
            up=False, resample=i < cfg.num_levels - 1, remat=remat, name=f"down_blocks_{i}", **kw,
        )(x, temb, context, (), deterministic)
        skips.extend(outputs)
    if mid_block:
        x = MidBlock(cfg, remat=remat, name="mid_block", **kw)(x, temb, context, deterministic)
    return x, skips


class UNet(nn.Module):
    """Conditional U-Net: (noisy latents, timesteps, text context[, SDXL added conditions]) ->
    prediction, all NHWC.

    `remat` recomputes each resnet and transformer block in the backward pass (training memory).
    """
    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 added_cond: Optional[Mapping[str, jax.Array]] = None,
                 deterministic: bool = True,
                 control: Optional[tuple[tuple[jax.Array, ...], jax.Array]] = None) -> jax.Array:
        """sample (B, H, W, in_channels), timesteps (B,) or scalar, encoder_hidden_states (B, L, D),
        added_cond {'text_embeds': (B, P), 'time_ids': (B, 6)} for SDXL, control (down residuals,
        mid residual) from ControlNets (`sdjax.models.controlnet`) -> (B, H, W, out_channels)."""
        cfg = self.config
        self._check_inputs(sample, encoder_hidden_states, added_cond)
        batch = sample.shape[0]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = cfg.block_out_channels

        temb = time_embedding(cfg, timesteps, added_cond, batch, kw)
        context = encoder_hidden_states.astype(self.dtype)

        x = conv3x3(channels[0], "conv_in", kw)(sample.astype(self.dtype))
        x, skips = encoder(cfg, x, temb, context, deterministic, self.remat, kw)
        if control is not None:
            # A ControlNet's residuals: one per skip, and one for the middle block's output.
            down_residuals, mid_residual = control
            if len(down_residuals) != len(skips):
                raise ValueError(f"UNet: {len(down_residuals)} ControlNet down residuals for "
                                 f"{len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
            x = x + mid_residual.astype(x.dtype)

        for i, block_type in enumerate(cfg.up_block_types):
            level = cfg.num_levels - 1 - i
            num_layers = cfg.layers[level] + 1
            level_skips, skips = skips[-num_layers:], skips[:-num_layers]
            # Sizes that halve unevenly on the way down are restored to the skip's exact size.
            upsample_size = skips[-1].shape[1:3] if skips else None
            x, _ = UNetLevel(
                cfg, channels[level], num_layers, cfg.heads[level], cfg.transformer_depths[level],
                cross_attention=block_type == "CrossAttnUpBlock2D", up=True, resample=level > 0,
                remat=self.remat, name=f"up_blocks_{i}", **kw,
            )(x, temb, context, tuple(level_skips), deterministic, upsample_size)

        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out", **kw)(x)
        return conv3x3(cfg.out_channels, "conv_out", kw)(nn.silu(x))

    def _check_inputs(self, sample, encoder_hidden_states, added_cond):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet: sample must be (B, H, W, {cfg.in_channels}) NHWC, got "
                             f"{sample.shape}")
        context_shape = encoder_hidden_states.shape
        if len(context_shape) != 3 or context_shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNet: encoder_hidden_states must be (B, L, "
                             f"{cfg.cross_attention_dim}), got {context_shape}")
        if cfg.addition_embed_type == "text_time":
            if added_cond is None or not {"text_embeds", "time_ids"} <= set(added_cond):
                raise ValueError("UNet: addition_embed_type 'text_time' needs added_cond with "
                                 "'text_embeds' and 'time_ids'")
            want = {"text_embeds": (sample.shape[0], cfg.text_embeds_dim),
                    "time_ids": (sample.shape[0], NUM_TIME_IDS)}
            for key, shape in want.items():
                if tuple(added_cond[key].shape) != shape:
                    raise ValueError(f"UNet: added_cond[{key!r}] must be {shape}, got "
                                     f"{tuple(added_cond[key].shape)}")
        elif added_cond is not None:
            raise ValueError("UNet: added_cond given, but the config has no addition_embed_type")
