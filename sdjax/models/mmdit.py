"""Stable Diffusion 3 / 3.5's multimodal diffusion transformer (MMDiT, Esser et al. 2024), as
diffusers' `SD3Transformer2DModel`: image patches and text tokens in two streams with weights of
their own, joined in each block's attention and modulated by the timestep and the pooled text.
SD 3.5 adds RMS-normed queries and keys (`qk_norm`) and, in its medium model, a second
image-only attention in the first blocks (MMDiT-X, `dual_attention_layers`). NHWC in and out.
Param names follow diffusers' module tree, with `joint_blocks_i` for its `transformer_blocks.i`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.layers import (ATTENTION_IMPLEMENTATIONS, Conv2D, Dense, GELUFeedForward,
                                 RMSNorm, SerializableConfig, TimestepEmbedding,
                                 check_field_types, dot_product_attention, lists_to_tuples,
                                 timestep_embedding)

# diffusers builds every norm of the model (adaLN, qk-norm, the final norm) with this epsilon.
_EPS = 1e-6
# Width of the sinusoidal timestep features fed to the timestep MLP.
_TIME_FEATURES = 256
QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig(SerializableConfig):
    """diffusers' `SD3Transformer2DModel` config (same field names and defaults), plus sdjax's
    `attention` implementation. Single files do not record `sample_size`; it only sets the scale of
    the initial position embedding (and a pipeline's default resolution): 128 in every release."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: Optional[int] = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: Optional[str] = None
    attention: str = "xla"

    def __post_init__(self):
        check_field_types(self)
        for field in ("sample_size", "patch_size", "in_channels", "num_layers",
                      "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                      "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"MMDiTConfig.{field}: must be positive, got "
                                 f"{getattr(self, field)}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MMDiTConfig.qk_norm: unsupported {self.qk_norm!r}; only None or "
                             f"'rms_norm'")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"MMDiTConfig.attention: unknown implementation {self.attention!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        # The text stream runs through blocks of the image stream's width.
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"MMDiTConfig.caption_projection_dim: {self.caption_projection_dim} "
                             f"must equal num_attention_heads * attention_head_dim "
                             f"({self.inner_dim})")
        # The 2-D sin-cos position embedding gives a quarter of the width to each sin/cos x row/col.
        if self.inner_dim % 4:
            raise ValueError(f"MMDiTConfig: width {self.inner_dim} (num_attention_heads * "
                             f"attention_head_dim) must be a multiple of 4")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"MMDiTConfig.dual_attention_layers: {bad[0]} is not a layer index "
                             f"(num_layers {self.num_layers})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, attention: str = "xla") -> "MMDiTConfig":
        """From an `SD3Transformer2DModel` `config.json` dict. Keys starting with `_` are metadata
        and skipped; any other key sdjax does not know is an error."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"MMDiTConfig: unknown diffusers config keys: {', '.join(unknown)}")
        return cls(attention=attention,
                   **{k: lists_to_tuples(v) for k, v in config.items() if k in fields})


def sincos_position_embedding(embed_dim: int, grid_size: int, base_size: float) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed` for a square grid: (grid_size**2, embed_dim) float32,
    tokens row-major; the first half of the width encodes the column, the second the row, each
    as [sin, cos] of the position (scaled so that `base_size` cells span the same range as the
    grid) times 10000^(-k / (embed_dim / 4))."""
    # float32 positions as the reference divides them, float64 frequencies and products.
    pos = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size)
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))

    def one_axis(p):
        out = np.outer(p.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(pos, pos, indexing="ij")
    emb = np.concatenate([one_axis(cols.reshape(-1)), one_axis(rows.reshape(-1))], axis=1)
    return emb.astype(np.float32)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (a stride-p conv, `proj`) plus the centre crop of a position table
    for `max_size` x `max_size` patches (`pos_embed`, (1, max_size**2, width), initialised with
    the sin-cos embedding). diffusers keeps the table as a buffer, outside training; here it is a
    param so that it loads and saves with the others (trainers should leave it frozen)."""
    features: int
    patch_size: int
    max_size: int
    base_size: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        p, m = self.patch_size, self.max_size
        rows, cols = h // p, w // p
        if rows > m or cols > m:
            raise ValueError(f"MMDiT: latents of {h}x{w} make {rows}x{cols} patches, more than "
                             f"pos_embed_max_size {m} per side")
        table = self.param(
            "pos_embed",
            lambda key, shape, dtype: jnp.asarray(
                sincos_position_embedding(self.features, m, self.base_size)[None], dtype),
            (1, m * m, self.features), self.param_dtype)
        tokens = Conv2D(self.features, (p, p), strides=(p, p), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="proj")(x.astype(self.dtype))
        top, left = (m - rows) // 2, (m - cols) // 2
        pos = table.reshape(m, m, self.features)[top:top + rows, left:left + cols]
        # The reference adds the float32 table and casts the sum back.
        tokens = tokens.astype(jnp.float32) + pos.astype(jnp.float32)
        return tokens.reshape(b, rows * cols, self.features).astype(self.dtype)


class AdaLayerNorm(nn.Module):
    """LayerNorm without params of its own, and `chunks` modulation vectors (B, 1, width) from
    linear(silu(emb)) for it and for the block around it: diffusers' AdaLayerNormZero (6),
    SD35AdaLayerNormZeroX (9) and AdaLayerNormContinuous (2) share this linear, named `linear`."""
    chunks: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        width = x.shape[-1]
        modulation = Dense(self.chunks * width, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="linear")(nn.silu(emb))
        normed = nn.LayerNorm(epsilon=_EPS, use_bias=False, use_scale=False, dtype=self.dtype,
                              name="norm")(x)
        return normed, jnp.split(modulation[:, None, :], self.chunks, axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class JointAttention(nn.Module):
    """diffusers' `Attention` with `JointAttnProcessor2_0`: the image tokens' queries, keys and
    values (to_q/to_k/to_v) and, given a context, the text tokens' (add_q_proj/add_k_proj/
    add_v_proj), each optionally RMS-normed per head, attend as one sequence (image first); the
    outputs split back into to_out and, when `context_output`, to_add_out. Without a context it
    is plain self-attention (MMDiT-X's attn2)."""
    heads: int
    head_dim: int
    qk_norm: bool = False
    context_output: bool = True
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None):
        width = x.shape[-1]
        inner = self.heads * self.head_dim
        dense = lambda features, name: Dense(features, dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=name)
        norm = lambda name: RMSNorm(_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name=name)

        def project(inputs, names, norm_names):
            q, k, v = (dense(inner, n)(inputs).reshape(inputs.shape[:2] + (self.heads,
                                                                            self.head_dim))
                       for n in names)
            if self.qk_norm:
                q, k = norm(norm_names[0])(q), norm(norm_names[1])(k)
            return q, k, v

        q, k, v = project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if context is not None:
            cq, ck, cv = project(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                 ("norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = dot_product_attention(q, k, v, implementation=self.implementation).astype(self.dtype)
        out = out.reshape(out.shape[:2] + (inner,))
        length = x.shape[1]
        x_out = dense(width, "to_out")(out[:, :length])
        if context is None:
            return x_out
        context_out = (dense(context.shape[-1], "to_add_out")(out[:, length:])
                       if self.context_output else None)
        return x_out, context_out


class JointBlock(nn.Module):
    """diffusers' `JointTransformerBlock`: adaLN-zero-modulated joint attention and GELU
    feed-forwards on both streams. `context_pre_only` (the last block) updates only the image
    stream: its text stream has a 2-vector adaLN (scale, shift), no output projection and no
    feed-forward, and the block returns None for it. `dual_attention` adds MMDiT-X's image-only
    attention (attn2), modulated by three more adaLN vectors."""
    heads: int
    head_dim: int
    context_pre_only: bool = False
    dual_attention: bool = False
    qk_norm: bool = False
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = lambda context_output, name: JointAttention(
            self.heads, self.head_dim, qk_norm=self.qk_norm, context_output=context_output,
            implementation=self.implementation, name=name, **kw)
        layer_norm = lambda y: nn.LayerNorm(epsilon=_EPS, use_bias=False, use_scale=False,
                                            dtype=self.dtype)(y)
        width = x.shape[-1]

        normed, mods = AdaLayerNorm(9 if self.dual_attention else 6, name="norm1", **kw)(x, temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.context_pre_only:
            context_normed, (c_scale, c_shift) = AdaLayerNorm(2, name="norm1_context", **kw)(
                context, temb)
            context_in = modulate(context_normed, c_shift, c_scale)
        else:
            context_normed, c_mods = AdaLayerNorm(6, name="norm1_context", **kw)(context, temb)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
            context_in = modulate(context_normed, c_shift_msa, c_scale_msa)

        attn_out, context_attn_out = attention(not self.context_pre_only, "attn")(
            modulate(normed, shift_msa, scale_msa), context_in)
        x = x + gate_msa * attn_out
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2 * attention(False, "attn2")(modulate(normed, shift_msa2, scale_msa2))
        ff = lambda name: GELUFeedForward(4 * width, width, name=name, **kw)
        x = x + gate_mlp * ff("ff")(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa * context_attn_out
        context = context + c_gate_mlp * ff("ff_context")(
            modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


class TimeTextEmbedding(nn.Module):
    """diffusers' `CombinedTimestepTextProjEmbeddings`: an MLP on the timestep's 256 sinusoidal
    features plus an MLP on the pooled text embedding, both linear_1 -> SiLU -> linear_2."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t_features = timestep_embedding(timestep, _TIME_FEATURES, flip_sin_to_cos=True)
        return (TimestepEmbedding(self.features, name="timestep_embedder", **kw)(
                    t_features.astype(self.dtype))
                + TimestepEmbedding(self.features, name="text_embedder", **kw)(
                    pooled.astype(self.dtype)))


class MMDiT(nn.Module):
    """SD3's transformer: (latents (B, H, W, in_channels), timestep (B,) = sigma * 1000, context
    (B, L, joint_attention_dim), pooled (B, pooled_projection_dim)) -> velocity (B, H, W,
    out_channels). `skip_layers` (static) leaves those joint blocks out, as diffusers'
    `skip_layers` does for skip-layer guidance. `remat` recomputes each block in the backward
    pass (training memory)."""
    config: MMDiTConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array,
                 skip_layers: tuple[int, ...] = ()) -> jax.Array:
        cfg = self.config
        self._check_inputs(x, context, pooled, skip_layers)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, _ = x.shape
        p, width = cfg.patch_size, cfg.inner_dim

        tokens = PatchEmbed(width, p, cfg.pos_embed_max_size, cfg.sample_size // p,
                            name="pos_embed", **kw)(x)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        temb = TimeTextEmbedding(width, name="time_text_embed", **kw)(timestep, pooled)
        context = Dense(cfg.caption_projection_dim, name="context_embedder", **kw)(
            context.astype(self.dtype))

        block = nn.remat(JointBlock) if self.remat else JointBlock
        for i in range(cfg.num_layers):
            if i in skip_layers:
                continue
            tokens, context = block(
                cfg.num_attention_heads, cfg.attention_head_dim,
                context_pre_only=i == cfg.num_layers - 1,
                dual_attention=i in cfg.dual_attention_layers, qk_norm=cfg.qk_norm is not None,
                implementation=cfg.attention, name=f"joint_blocks_{i}", **kw)(tokens, context, temb)

        normed, (scale, shift) = AdaLayerNorm(2, name="norm_out", **kw)(tokens, temb)
        out = Dense(p * p * cfg.output_channels, name="proj_out", **kw)(
            modulate(normed, shift, scale))
        # Each token's (p, p, C) patch back into place.
        out = out.reshape(b, h // p, w // p, p, p, cfg.output_channels)
        return out.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, cfg.output_channels)

    def _check_inputs(self, x, context, pooled, skip_layers):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"MMDiT: latents must be (B, H, W, {cfg.in_channels}) NHWC, got "
                             f"{x.shape}")
        if x.shape[1] % cfg.patch_size or x.shape[2] % cfg.patch_size:
            raise ValueError(f"MMDiT: latent size {x.shape[1]}x{x.shape[2]} is not a multiple of "
                             f"patch_size {cfg.patch_size}")
        if context.ndim != 3 or context.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"MMDiT: context must be (B, L, {cfg.joint_attention_dim}), got "
                             f"{context.shape}")
        if tuple(pooled.shape) != (x.shape[0], cfg.pooled_projection_dim):
            raise ValueError(f"MMDiT: pooled must be ({x.shape[0]}, "
                             f"{cfg.pooled_projection_dim}), got {pooled.shape}")
        if not isinstance(skip_layers, tuple) or not all(
                isinstance(i, int) and 0 <= i < cfg.num_layers for i in skip_layers):
            raise ValueError(f"MMDiT: skip_layers must be a tuple of layer indices below "
                             f"{cfg.num_layers}, got {skip_layers!r}")


def example_inputs(config: MMDiTConfig, dtype=jnp.float32) -> tuple[jax.Array, ...]:
    """The smallest inputs `MMDiT.init` accepts for `config` (params do not depend on sizes)."""
    p = config.patch_size
    return (jnp.zeros((1, p, p, config.in_channels), dtype), jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, config.joint_attention_dim), dtype),
            jnp.zeros((1, config.pooled_projection_dim), dtype))


__all__ = ["MMDiTConfig", "MMDiT", "JointBlock", "JointAttention", "AdaLayerNorm", "PatchEmbed",
           "TimeTextEmbedding",
           "sincos_position_embedding", "example_inputs", "QK_NORMS"]
