"""Building blocks shared by the model families: attention, feed-forward, resnet block,
up/down sampling, timestep embeddings and the configs' dict form. Shapes are NHWC /
(batch, length, features)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

# Attention implementations selectable by config. "xla" is jax.nn.dot_product_attention's
# portable path, except on the CPU backend, where it runs "blocked"; "cudnn" asks for the fused GPU
# kernel; "reference" is plain einsum + softmax in float32, the yardstick for the others;
# "blocked" computes the same float32 logits and softmax one (batch, head, query block) at a time
# (masked or causal attention, CLIP's 77 tokens, takes the "reference" path instead).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "reference", "blocked")
# Query rows per block of "blocked": the block's logits (rows x keys, float32) stay within a few MiB,
# i.e. in cache, where XLA's CPU softmax over whole (B, H, Lq, Lk) logits streams them through
# memory several times (5x slower for SD's 4096-token self-attention, 256-512 rows measured best).
_BLOCK_ROWS_LONG_KEYS, _BLOCK_ROWS = 512, 256


def accumulation_dtype(dtype) -> Optional[jnp.dtype]:
    """The `preferred_element_type` sdjax gives a contraction of `dtype` inputs: float32 for 16-bit
    inputs on the CPU backend, else None (the inputs' dtype). XLA's CPU dot emits a bfloat16
    result at half the speed of a float32 one from the same bfloat16 inputs (4096² matmul, 2 AVX-512
    cores with avx512_bf16: 321 vs 669 GFLOP/s; float32 inputs: 371), so there the result is rounded
    to the input dtype afterwards, once, as PyTorch's bfloat16 GEMM does. GPU/TPU are unchanged."""
    if jnp.dtype(dtype).itemsize == 2 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return None


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
    """`jax.lax.dot_general` with `accumulation_dtype`'s result type, rounded back to the inputs'
    dtype (unless the caller asked for a result type)."""
    accumulate = preferred_element_type or accumulation_dtype(lhs.dtype)
    y = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                            preferred_element_type=accumulate)
    return y if preferred_element_type is not None else y.astype(jnp.result_type(lhs, rhs))


def einsum(subscripts: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """Two-operand `jnp.einsum` with `dot_general`'s accumulation and result dtype."""
    y = jnp.einsum(subscripts, lhs, rhs, preferred_element_type=accumulation_dtype(lhs.dtype))
    return y.astype(jnp.result_type(lhs, rhs))


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention core. q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D).

    `mask` is boolean, broadcastable to (B, H, Lq, Lk); True means "may attend". `bias`, broadcastable
    to the same, is added to the logits (T5's relative positions); `scale` multiplies the logits
    (None: 1/sqrt(D); T5 uses 1).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if implementation == "xla" and jax.default_backend() == "cpu":
        implementation = "blocked"
    if implementation == "blocked" and mask is None and bias is None and not is_causal:
        return _blocked_attention(query, key, value, scale)
    if implementation in ("reference", "blocked"):
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                            preferred_element_type=jnp.float32) * scale
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        if is_causal:
            lq, lk = query.shape[1], key.shape[1]
            causal = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return einsum("bhqk,bkhd->bqhd", weights, value)
    return jax.nn.dot_product_attention(
        query, key, value, bias=None if bias is None else bias.astype(query.dtype), mask=mask,
        scale=scale, is_causal=is_causal,
        implementation=None if implementation == "xla" else implementation)


def _blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                       scale: Optional[float] = None) -> jax.Array:
    """Unmasked attention with the numerics of "reference", one (batch x head, query block) at a
    time: each block's logits stay small enough to be reused from cache by the softmax and the
    second matmul."""
    b, lq, h, d = query.shape
    lk = key.shape[1]
    rows = min(lq, _BLOCK_ROWS_LONG_KEYS if lk >= 2048 else _BLOCK_ROWS)
    blocks = -(-lq // rows)
    # Padded query rows are independent of the real ones and are dropped at the end.
    query = jnp.pad(query, ((0, 0), (0, blocks * rows - lq), (0, 0), (0, 0)))
    heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape((b * h,) + x.shape[1:2] + (d,))
    q = heads_first(query).reshape(b * h, blocks, rows, d)
    k, v = heads_first(key), heads_first(value)
    scale = d ** -0.5 if scale is None else scale

    def one_head(args):
        q_head, k_head, v_head = args

        def one_block(q_block):
            logits = jnp.einsum("qd,kd->qk", q_block, k_head,
                                preferred_element_type=jnp.float32) * scale
            weights = jax.nn.softmax(logits, axis=-1).astype(v_head.dtype)
            return einsum("qk,kd->qd", weights, v_head)

        return jax.lax.map(one_block, q_head)

    out = jax.lax.map(one_head, (q, k, v)).reshape(b, h, blocks * rows, d)[:, :, :lq]
    return jnp.transpose(out, (0, 2, 1, 3))


import math  # noqa: E402

import numpy as np  # noqa: E402

import flax.linen as nn  # noqa: E402


# The variable collection that carries low-rank adapters (LoRA and kin) into `Dense` and `Conv2D`:
# a tree beside "params" with the same module paths. Each adapted layer holds either
#   down (in, R) or (kh, kw, in, R), up (R, out), scale (R,) or (B, R):  y += ((x.down) * scale) . up
# (several adapters on one layer are concatenated along R; a scale per rank keeps each adapter's
# weight and alpha/rank as data), and/or
#   delta (n, *kernel.shape), delta_scale (n,):                          y += x . sum_n(scale_n delta_n)
#   [delta_bias (n, out):                                                y += sum_n(scale_n delta_bias_n)]
# (LyCORIS products that are not low rank; full differences may change the bias too). A model
# applied without the collection is unchanged.
# Training adds dropout_key (a PRNG key's raw data) and dropout_rate (scalar): kohya's neuron
# dropout, each element of x.down zeroed with that probability and the rest scaled by 1/(1-rate).
ADAPTER_COLLECTION = "lora"


# Where a params dict (`Pretrained.params`: {"unet": ..., "text_encoder": ...}) carries the adapter
# collections of its models: params[ADAPTERS_KEY][model name].
ADAPTERS_KEY = "adapters"


def model_variables(params: dict, name: str) -> dict:
    """The variables to apply model `name` of a params dict with: its params, and its adapters'
    collection when the dict carries one."""
    variables = {"params": params[name]}
    adapters = params.get(ADAPTERS_KEY, {}).get(name)
    if adapters:
        variables[ADAPTER_COLLECTION] = adapters
    return variables


def _rank_scale(scale: jax.Array, h: jax.Array) -> jax.Array:
    """A (R,) scale, or a (B, R) one (per-example rank dropout), broadcast against h (B, ..., R)."""
    if scale.ndim == 2:
        return scale.reshape((scale.shape[0],) + (1,) * (h.ndim - 2) + (scale.shape[1],))
    return scale


def _adapter_output(module: nn.Module, x: jax.Array, y: jax.Array, contract_down, contract_delta):
    """`y` plus what the adapters in `module`'s ADAPTER_COLLECTION entry add for input `x`."""
    if module.has_variable(ADAPTER_COLLECTION, "down"):
        down, up, scale = (module.get_variable(ADAPTER_COLLECTION, n) for n in ("down", "up", "scale"))
        h = contract_down(x, down.astype(x.dtype))
        if module.has_variable(ADAPTER_COLLECTION, "dropout_key"):
            key = jax.random.wrap_key_data(module.get_variable(ADAPTER_COLLECTION, "dropout_key"))
            rate = module.get_variable(ADAPTER_COLLECTION, "dropout_rate").astype(jnp.float32)
            keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
            h = jnp.where(keep, h / (1.0 - rate).astype(h.dtype), jnp.zeros((), h.dtype))
        h = h * _rank_scale(scale, h).astype(h.dtype)
        y = y + dot_general(h, up.astype(h.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    if module.has_variable(ADAPTER_COLLECTION, "delta"):
        delta = module.get_variable(ADAPTER_COLLECTION, "delta")
        delta_scale = module.get_variable(ADAPTER_COLLECTION, "delta_scale")
        kernel = jnp.tensordot(delta_scale.astype(jnp.float32), delta.astype(jnp.float32), 1)
        y = y + contract_delta(x, kernel.astype(x.dtype))
        if module.has_variable(ADAPTER_COLLECTION, "delta_bias"):
            bias = module.get_variable(ADAPTER_COLLECTION, "delta_bias").astype(jnp.float32)
            y = y + jnp.tensordot(delta_scale.astype(jnp.float32), bias, 1).astype(y.dtype)
    return y


class Dense(nn.Dense):
    """`nn.Dense` (same params and names) contracting with `dot_general`: sdjax's dense layer,
    plus the adapters of ADAPTER_COLLECTION when the model is applied with them."""
    dot_general: Any = dot_general

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        contract = lambda a, w: dot_general(a, w, (((a.ndim - 1,), (0,)), ((), ())))
        return _adapter_output(self, inputs.astype(self.dtype or inputs.dtype), y, contract,
                               contract)


class SerializableConfig:
    """`to_dict` / `from_dict` of the frozen config dataclasses, for native checkpoints' manifests:
    JSON-ready (tuples as lists, nested configs as dicts) and back; an unknown key is an error."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        types = typing.get_type_hints(cls)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields: {', '.join(unknown)}")
        return cls(**{k: types[k].from_dict(v) if _is_config_type(types[k]) else lists_to_tuples(v)
                      for k, v in d.items()})


def check_field_types(config) -> None:
    """Every field of a config dataclass holds a value of its annotated type (ints are not floats'
    only stand-ins the other way round), so a config.json with `"block_out_channels": "abc"` is a
    one-line error naming the field rather than a failure somewhere inside the model."""
    types = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _matches(value, types[field.name]):
            raise ValueError(f"{type(config).__name__}.{field.name}: expected "
                             f"{_type_name(types[field.name])}, got {value!r}")


def _matches(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # a construct not checked here


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _is_config_type(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, SerializableConfig)


def _to_json(value):
    if isinstance(value, SerializableConfig):
        return value.to_dict()
    return [_to_json(v) for v in value] if isinstance(value, tuple) else value


def check_block_types(config, **allowed: tuple[str, ...]) -> None:
    """`config.block_out_channels` must name at least one level, and each named field one of its
    allowed block types per level."""
    name, n = type(config).__name__, len(config.block_out_channels)
    if n == 0:
        raise ValueError(f"{name}.block_out_channels: must name at least one level")
    for field, choices in allowed.items():
        types = getattr(config, field)
        bad = [t for t in types if t not in choices]
        if bad:
            raise ValueError(f"{name}.{field}: unsupported block type {bad[0]!r}; "
                             f"choose from {', '.join(choices)}")
        if len(types) != n:
            raise ValueError(f"{name}.{field}: {len(types)} entries, but block_out_channels "
                             f"has {n}")


def lists_to_tuples(value):
    """JSON lists (nested too) as tuples, so that a config hashes."""
    return tuple(lists_to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class Attention(nn.Module):
    """Multi-head attention: queries from `x`, keys and values from `context` (None:
    self-attention), the core through `dot_product_attention`. `names` (q, k, v, out) and
    `use_bias` follow each family's reference, so that its weights convert by name."""
    heads: int
    head_dim: Optional[int] = None  # None: the input width // heads
    out_features: Optional[int] = None  # None: the input width
    names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out")
    use_bias: tuple[bool, bool, bool, bool] = (True, True, True, True)
    scale: Optional[float] = None  # of the logits; None: 1/sqrt(head_dim)
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *,
                 mask: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
                 is_causal: bool = False) -> jax.Array:
        context = x if context is None else context
        head_dim = self.head_dim or x.shape[-1] // self.heads
        inner = self.heads * head_dim
        dense = lambda features, i: Dense(features, use_bias=self.use_bias[i], dtype=self.dtype,
                                          param_dtype=self.param_dtype, name=self.names[i])

        def project(inputs, i):
            y = dense(inner, i)(inputs)
            # (B, L, heads * head_dim) -> (B, L, heads, head_dim): a free reshape, no transpose.
            return y.reshape(y.shape[:-1] + (self.heads, head_dim))

        q, k, v = project(x, 0), project(context, 1), project(context, 2)
        # diffusers' upcast_attention (SD 2.1-v) computes logits and softmax in float32 to avoid
        # half-precision overflow; every implementation here always does, so it needs no flag.
        out = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=self.scale,
                                    is_causal=is_causal,
                                    implementation=self.implementation).astype(self.dtype)
        out = out.reshape(out.shape[:-2] + (inner,))
        return dense(self.out_features or x.shape[-1], 3)(out)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (Zhang & Sennrich 2019) with a learnt `scale`,
    computed in float32 as diffusers' and T5's RMSNorm are, then cast to `dtype`."""
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        if scale.dtype in (jnp.bfloat16, jnp.float16):
            # As the references: normalised values rounded to 16-bit weights' dtype, then scaled.
            return (x.astype(scale.dtype) * scale).astype(self.dtype)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), as in DDPM."""
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - freq_shift)
    # The frequencies are constants: correctly rounded on the host, as the references' float32 exp
    # nearly always is. XLA's exp differs in the last bit for some of them, which timesteps in the
    # thousands (Flux's t and guidance, times 1000) turn into visible angle errors.
    frequencies = np.exp(exponent.astype(np.float32).astype(np.float64)).astype(np.float32)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(frequencies)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(emb)
        emb = nn.silu(emb)
        return Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(emb)


# Spatial positions per image up to which a stride-1 conv runs as one matmul over its patches
# (im2col): XLA's CPU convolution reaches a quarter of matmul speed on the U-Net's small, wide maps
# (8x8x1280: 116 ms vs 36 ms as a matmul) but wins from 32x32 up.
_IM2COL_MAX_POSITIONS = 16 * 16


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
    """NHWC x HWIO convolution; small stride-1 maps run as one matmul over their patches."""
    kh, kw, c, features = kernel.shape
    b, h, w, _ = x.shape
    if tuple(strides) == (1, 1) and h * w <= _IM2COL_MAX_POSITIONS:
        x = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
        out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
        # Patch channels in (row, column, input channel) order: the HWIO kernel's flat order.
        patches = jnp.concatenate([x[:, i:i + out_h, j:j + out_w]
                                   for i in range(kh) for j in range(kw)], axis=-1)
        return einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * c, features))
    return jax.lax.conv_general_dilated(x, kernel, tuple(strides), tuple(padding),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2D(nn.Module):
    """`nn.Conv` on NHWC with HWIO `kernel` and `bias` params (same names, shapes and init), that
    runs small stride-1 maps as a matmul over their patches, plus the adapters of
    ADAPTER_COLLECTION (their `down` a conv of the same stride and padding, `up` 1x1)."""
    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.padding) + bias
        contract = lambda a, w: conv2d(a, w, self.strides, self.padding)
        return _adapter_output(self, x, y, contract, contract)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, (+ projected time embedding), GroupNorm -> SiLU -> conv, plus a
    1x1-conv shortcut when the width changes. `temb` None means no time conditioning (VAE)."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        conv = lambda feats, k, name: Conv2D(feats, (k, k), padding=((k // 2, k // 2),) * 2,
                                             dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        h = conv(self.out_channels, 3, "conv1")(nn.silu(norm("norm1")(x)))
        if temb is not None:
            t = Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(norm("norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W. `asymmetric_padding` pads only bottom/right, as the KL-VAE does."""
    out_channels: int
    asymmetric_padding: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_padding else ((1, 1), (1, 1))
        return Conv2D(self.out_channels, (3, 3), strides=(2, 2), padding=padding,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `output_size` when an odd input size was halved on the
    way down, as the reference's `upsample_size`) followed by a 3x3 conv."""
    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
        h, w = x.shape[1:3]
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            # Nearest as PyTorch computes it: source index floor(dst * in / out).
            out_h, out_w = output_size
            rows = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(np.int32), h - 1)
            cols = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(np.int32), w - 1)
            x = x[:, rows][:, :, cols]
        return Conv2D(self.out_channels, (3, 3), padding=((1, 1), (1, 1)),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class GELUFeedForward(nn.Module):
    """Transformer feed-forward with a GELU between two dense layers, as diffusers' `FeedForward`
    with activation "gelu-approximate" (the tanh form; SD3's and Flux's blocks): proj (dim ->
    inner), gelu, out (inner -> dim)."""
    inner_features: int
    out_features: Optional[int] = None
    approximate: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.inner_features, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="proj")(x)
        h = jax.nn.gelu(h, approximate=self.approximate)
        return Dense(self.out_features or x.shape[-1], dtype=self.dtype,
                     param_dtype=self.param_dtype, name="out")(h)


class GEGLUFeedForward(nn.Module):
    """Transformer feed-forward with a GELU-gated linear unit (Shazeer 2020), as in the SD U-Net:
    proj (dim -> 2 * inner), value * gelu(gate), out (inner -> dim). GELU is the exact (erf) form."""
    inner_features: int
    out_features: Optional[int] = None
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = Dense(2 * self.inner_features, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * jax.nn.gelu(gate, approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return Dense(self.out_features or x.shape[-1], dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out")(h)
