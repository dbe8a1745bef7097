"""Flux.1's rectified-flow transformer (diffusers' `FluxTransformer2DModel`; dev and schnell):
double-stream blocks (text and image tokens with their own weights, one joint attention), then
single-stream blocks over the joined sequence, with 3-axis rotary positions and adaLN modulation by
the timestep (+ guidance) and pooled text embedding.

The model takes NHWC latents and returns NHWC velocities: the 2x2 packing into tokens and the
position ids are built inside from the shapes. Param names follow diffusers' module tree with `_i`
for list indices (`transformer_blocks_0/attn/to_q`, `single_transformer_blocks_3/proj_mlp`), and
diffusers' `ff.net.0.proj` / `ff.net.2` as `ff/proj` / `ff/out`, as in the U-Net.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.layers import (ATTENTION_IMPLEMENTATIONS, Dense, GELUFeedForward, RMSNorm,
                                 SerializableConfig, TimestepEmbedding, check_field_types,
                                 dot_product_attention, lists_to_tuples, timestep_embedding)
from sdjax.models.mmdit import AdaLayerNorm, modulate

# Frequency base of the rotary embedding, the width of the sinusoidal timestep / guidance features
# and the feed-forward widening: fixed in diffusers' FluxTransformer2DModel (and BFL's Flux).
ROPE_THETA = 10000.0
TIME_FEATURES = 256
MLP_RATIO = 4
_NORM_EPS = 1e-6
# Flux packs each 2x2 patch of latent pixels into one token.
PACK = 2


@dataclasses.dataclass(frozen=True)
class FluxConfig(SerializableConfig):
    """diffusers' `FluxTransformer2DModel` config (same field names and defaults: Flux.1 dev has
    `guidance_embeds=True`, schnell False), plus sdjax's `attention` implementation.

    `in_channels` / `out_channels` count packed channels (4 x the VAE's latent channels);
    `axes_dims_rope` splits each head's width between the rotary axes (unused, row, column)."""
    patch_size: int = 1
    in_channels: int = 64
    out_channels: Optional[int] = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    attention: str = "xla"

    def __post_init__(self):
        check_field_types(self)
        name = type(self).__name__
        # diffusers' FluxTransformer2DModel embeds packed tokens as they come and only widens
        # proj_out by patch_size**2, which its pipelines could not unpack: every Flux uses 1.
        if self.patch_size != 1:
            raise ValueError(f"{name}.patch_size: only 1 is supported (Flux packs 2x2 latent "
                             f"patches before the model), got {self.patch_size}")
        for field in ("in_channels", "out_channels"):
            value = getattr(self, field)
            if value is not None and (value < PACK * PACK or value % (PACK * PACK)):
                raise ValueError(f"{name}.{field}: must be a positive multiple of 4 (packed 2x2 "
                                 f"latent patches), got {value}")
        for field in ("num_attention_heads", "attention_head_dim", "joint_attention_dim",
                      "pooled_projection_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}.{field}: must be positive, got {getattr(self, field)}")
        for field in ("num_layers", "num_single_layers"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field}: must be >= 0, got {getattr(self, field)}")
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(d < 2 or d % 2 for d in axes) or sum(axes) != self.attention_head_dim:
            raise ValueError(f"{name}.axes_dims_rope: must be 3 even widths summing to "
                             f"attention_head_dim {self.attention_head_dim}, got {axes}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"{name}.attention: unknown implementation {self.attention!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the NHWC latents the model takes (in_channels / 4)."""
        return self.in_channels // (PACK * PACK)

    @property
    def out_latent_channels(self) -> int:
        """Channels of the NHWC latents the model returns ((out_channels or in_channels) / 4)."""
        return (self.out_channels or self.in_channels) // (PACK * PACK)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, attention: str = "xla") -> "FluxConfig":
        """From a `FluxTransformer2DModel` `config.json` dict. Keys starting with `_` are metadata;
        any other key sdjax does not know is an error."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown diffusers config keys: {', '.join(unknown)}")
        return cls(attention=attention,
                   **{k: lists_to_tuples(v) for k, v in config.items() if k in fields})


# ---- Packing and positions (diffusers' FluxPipeline._pack_latents & co., on NHWC) -----------------
def pack_latents(latents: jax.Array) -> jax.Array:
    """(B, H, W, C) latents -> (B, H/2 * W/2, 4C) tokens: each 2x2 patch in row-major order of
    patches, its features ordered (channel, row in patch, column in patch) as diffusers packs NCHW."""
    b, h, w, c = latents.shape
    x = jnp.reshape(latents, (b, h // PACK, PACK, w // PACK, PACK, c))
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))
    return jnp.reshape(x, (b, (h // PACK) * (w // PACK), c * PACK * PACK))


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `pack_latents`: (B, H/2 * W/2, 4C) tokens -> (B, H, W, C) for latent size (H, W)."""
    b, n, features = tokens.shape
    c = features // (PACK * PACK)
    x = jnp.reshape(tokens, (b, height // PACK, width // PACK, c, PACK, PACK))
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))
    return jnp.reshape(x, (b, height, width, c))


def image_ids(height: int, width: int) -> np.ndarray:
    """(height * width, 3) float32 position ids of a packed token grid of height x width (latent
    size / 2): (0, row, column), as diffusers' `_prepare_latent_image_ids(batch, height, width)`."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def rotary_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = ROPE_THETA
                  ) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (L, sum(axes_dims)) float32, of the rotary embedding of position ids
    (L, n_axes): axis i's ids rotate its own `axes_dims[i]` channels, each frequency repeated for
    the two channels of its pair. Computed in float64 on the host as diffusers' FluxPosEmbed does;
    the ids depend on shapes alone, so the tables are constants of the compiled program."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(ids[:, axis].astype(np.float32).astype(np.float64), freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return (np.concatenate(cos, axis=1).astype(np.float32),
            np.concatenate(sin, axis=1).astype(np.float32))


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate each channel pair (2i, 2i+1) of x (B, L, heads, head_dim) by its position's angle
    (diffusers' apply_rotary_emb with use_real, unbind dim -1), in float32."""
    pairs = x.reshape(x.shape[:-1] + (-1, 2))
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _clip_float16(x: jax.Array) -> jax.Array:
    """diffusers clips the residual streams to float16's range, which Flux's activations exceed."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


# ---- Modules ----------------------------------------------------------------------------------------
class FluxAttention(nn.Module):
    """Multi-head attention with RMS-normed queries and keys and rotary positions. With `context`
    (double-stream blocks) the text tokens get their own projections and norms (`add_*_proj`,
    `norm_added_*`), both streams attend jointly as [text, image], and each gets its own output
    projection; without it (single-stream blocks) it returns the heads' output unprojected."""
    heads: int
    head_dim: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                 context: Optional[jax.Array] = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim

        def project(inputs, names, norms):
            q, k, v = (Dense(inner, name=n, **kw)(inputs).reshape(
                inputs.shape[:-1] + (self.heads, self.head_dim)) for n in names)
            q = RMSNorm(_NORM_EPS, name=norms[0], **kw)(q)
            k = RMSNorm(_NORM_EPS, name=norms[1], **kw)(k)
            return q, k, v

        q, k, v = project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if context is not None:
            text = project(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                           ("norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate([t, i], axis=1) for t, i in zip(text, (q, k, v)))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = dot_product_attention(q, k, v, implementation=self.implementation)
        out = out.astype(self.dtype).reshape(out.shape[:2] + (inner,))
        if context is None:
            return out
        text_len = context.shape[1]
        return (Dense(x.shape[-1], name="to_out", **kw)(out[:, text_len:]),
                Dense(context.shape[-1], name="to_add_out", **kw)(out[:, :text_len]))


class FluxTransformerBlock(nn.Module):
    """Double-stream block (diffusers' FluxTransformerBlock): image and text tokens each modulated,
    attended jointly, then through their own feed-forward, each step gated into its residual."""
    heads: int
    head_dim: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, context: jax.Array, temb: jax.Array,
                 rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_hidden, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = \
            AdaLayerNorm(6, name="norm1", **kw)(hidden, temb)
        norm_context, (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = \
            AdaLayerNorm(6, name="norm1_context", **kw)(context, temb)
        attn_hidden, attn_context = FluxAttention(
            self.heads, self.head_dim, self.implementation, name="attn", **kw)(
                modulate(norm_hidden, shift_msa, scale_msa), rope,
                modulate(norm_context, c_shift_msa, c_scale_msa))
        layer_norm = nn.LayerNorm(epsilon=_NORM_EPS, use_bias=False, use_scale=False,
                                  dtype=self.dtype)
        ff = lambda name: GELUFeedForward(MLP_RATIO * hidden.shape[-1], name=name, **kw)
        hidden = hidden + gate_msa * attn_hidden
        hidden = hidden + gate_mlp * ff("ff")(modulate(layer_norm(hidden), shift_mlp, scale_mlp))
        context = context + c_gate_msa * attn_context
        context = context + c_gate_mlp * ff("ff_context")(
            modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return _clip_float16(context), hidden


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block (diffusers' FluxSingleTransformerBlock) over the joined [text, image]
    tokens: attention and a tanh-GELU MLP side by side on the modulated input, their outputs
    concatenated through one projection and gated into the residual."""
    heads: int
    head_dim: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        normed, (shift, scale, gate) = AdaLayerNorm(3, name="norm", **kw)(x, temb)
        norm_x = modulate(normed, shift, scale)
        mlp = jax.nn.gelu(Dense(MLP_RATIO * dim, name="proj_mlp", **kw)(norm_x), approximate=True)
        attn = FluxAttention(self.heads, self.head_dim, self.implementation, name="attn",
                             **kw)(norm_x, rope)
        out = Dense(dim, name="proj_out", **kw)(jnp.concatenate([attn, mlp], axis=-1))
        return _clip_float16(x + gate * out)


class TimeTextEmbedding(nn.Module):
    """diffusers' CombinedTimestep[Guidance]TextProjEmbeddings: MLPs of the sinusoidal timestep
    (and guidance) features, plus a projection of the pooled text embedding, summed."""
    features: int
    guidance_embeds: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, guidance: Optional[jax.Array],
                 pooled: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def embed(values, name):
            features = timestep_embedding(values, TIME_FEATURES, flip_sin_to_cos=True,
                                          freq_shift=0)
            return TimestepEmbedding(self.features, name=name, **kw)(features.astype(pooled.dtype))

        emb = embed(timestep, "timestep_embedder")
        if self.guidance_embeds:
            emb = emb + embed(guidance, "guidance_embedder")
        # PixArt-alpha's text projection (SiLU) has the timestep MLP's layers and names.
        return emb + TimestepEmbedding(self.features, name="text_embedder", **kw)(pooled)


class FluxTransformer(nn.Module):
    """Flux.1: (latents (B, H, W, in_channels/4) NHWC, timestep (B,) = sigma in [0, 1], context
    (B, L, joint_attention_dim), pooled (B, pooled_projection_dim), guidance (B,) (dev) or None
    (schnell)) -> velocity (B, H, W, out_channels/4). H and W must be even.

    Timestep and guidance are multiplied by 1000 inside, as diffusers does; scalars broadcast over
    the batch. `remat` recomputes each block in the backward pass (training memory)."""
    config: FluxConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, latents: jax.Array, timestep: jax.Array, context: jax.Array,
                 pooled: jax.Array, guidance: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        self._check_inputs(latents, context, pooled, guidance)
        b, h, w, _ = latents.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = cfg.inner_dim

        hidden = Dense(inner, name="x_embedder", **kw)(pack_latents(latents.astype(self.dtype)))
        # diffusers (as BFL) rounds sigma and sigma * 1000 to the compute dtype before the float32
        # sinusoids, whose fast frequencies turn that rounding (bfloat16: 0.95 -> 948) into another
        # embedding; reduce_precision keeps XLA from computing it in excess precision.
        round_to_dtype = lambda v: jax.lax.reduce_precision(
            v, exponent_bits=jnp.finfo(self.dtype).nexp, mantissa_bits=jnp.finfo(self.dtype).nmant)
        scaled = lambda v: round_to_dtype(
            round_to_dtype(jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b,))) * 1000)
        temb = TimeTextEmbedding(inner, cfg.guidance_embeds, name="time_text_embed", **kw)(
            scaled(timestep), scaled(guidance) if cfg.guidance_embeds else None,
            pooled.astype(self.dtype))
        context = Dense(inner, name="context_embedder", **kw)(context.astype(self.dtype))

        text_len = context.shape[1]
        ids = np.concatenate([np.zeros((text_len, 3), np.float32), image_ids(h // PACK, w // PACK)])
        rope = tuple(jnp.asarray(t) for t in rotary_tables(ids, cfg.axes_dims_rope))

        block_kw = dict(heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                        implementation=cfg.attention, **kw)
        double = nn.remat(FluxTransformerBlock) if self.remat else FluxTransformerBlock
        for i in range(cfg.num_layers):
            context, hidden = double(name=f"transformer_blocks_{i}", **block_kw)(
                hidden, context, temb, rope)
        # diffusers joins and splits the streams around every single block; once is the same.
        joint = jnp.concatenate([context, hidden], axis=1)
        single = nn.remat(FluxSingleTransformerBlock) if self.remat else FluxSingleTransformerBlock
        for i in range(cfg.num_single_layers):
            joint = single(name=f"single_transformer_blocks_{i}", **block_kw)(joint, temb, rope)
        # AdaLayerNormContinuous: (scale, shift), the other way round from adaLN-zero.
        normed, (scale, shift) = AdaLayerNorm(2, name="norm_out", **kw)(joint[:, text_len:], temb)
        hidden = modulate(normed, shift, scale)
        out = Dense(cfg.patch_size ** 2 * (cfg.out_channels or cfg.in_channels), name="proj_out",
                    **kw)(hidden)
        return unpack_latents(out, h, w)

    def _check_inputs(self, latents, context, pooled, guidance):
        cfg = self.config
        shape = latents.shape
        if len(shape) != 4 or shape[-1] != cfg.latent_channels or shape[1] % PACK or shape[2] % PACK:
            raise ValueError(f"FluxTransformer: latents must be (B, H, W, {cfg.latent_channels}) "
                             f"NHWC with even H and W, got {shape}")
        if context.ndim != 3 or context.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"FluxTransformer: context must be (B, L, {cfg.joint_attention_dim}),"
                             f" got {context.shape}")
        if pooled.ndim != 2 or pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(f"FluxTransformer: pooled must be (B, {cfg.pooled_projection_dim}), "
                             f"got {pooled.shape}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("FluxTransformer: guidance is required: the config has "
                             "guidance_embeds (a guidance-distilled model such as Flux.1 dev)")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("FluxTransformer: guidance given, but the config has no "
                             "guidance_embeds (Flux.1 schnell takes none)")


def example_inputs(config: FluxConfig, dtype=jnp.float32) -> tuple[Optional[jax.Array], ...]:
    """The smallest inputs `FluxTransformer.init` accepts for `config` (params do not depend on
    sizes): latents, timestep, context, pooled, guidance (None without guidance_embeds)."""
    return (jnp.zeros((1, PACK, PACK, config.latent_channels), dtype), jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, config.joint_attention_dim), dtype),
            jnp.zeros((1, config.pooled_projection_dim), dtype),
            jnp.zeros((1,), jnp.float32) if config.guidance_embeds else None)


__all__ = ["FluxConfig", "FluxTransformer", "FluxTransformerBlock", "FluxSingleTransformerBlock",
           "FluxAttention", "TimeTextEmbedding", "pack_latents", "unpack_latents", "image_ids",
           "rotary_tables", "apply_rotary", "example_inputs"]
