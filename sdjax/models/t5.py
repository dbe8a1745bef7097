"""The T5 encoder (SD3's and Flux's long-prompt text encoder, T5 v1.1 XXL), numerically as
transformers' `T5EncoderModel`: pre-norm blocks with RMS norms (no mean, no bias), attention with
no 1/sqrt(d) scaling and a learnt bias per relative-position bucket (computed once, by the first
layer's table, and shared by every layer), and a feed-forward that is gated in v1.1
("gated-gelu": gelu_new, the tanh form) and plain in v1.0 ("relu").

T5-XXL overflows in float16 (transformers keeps its `wo` layers in float32 and clamps the residual
stream for it); run it in bfloat16 or float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.layers import (ATTENTION_IMPLEMENTATIONS, Attention, Dense, RMSNorm,
                                 SerializableConfig, check_field_types)

# transformers' ACT2FN entries a T5 feed-forward can name; "gated-gelu" means gelu_new, the rest
# `[gated-]NAME` with NAME's own function.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}

# transformers' T5Config fields and PretrainedConfig keys that do not change the encoder's output
# (decoder, dropout, initialisation, generation and bookkeeping): accepted and ignored.
_IGNORED_KEYS = frozenset((
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "dense_act_fn", "is_gated_act",  # derived from feed_forward_proj, as transformers does
    "dropout_rate", "classifier_dropout", "initializer_factor", "is_encoder_decoder", "is_decoder",
    "num_decoder_layers", "decoder_start_token_id", "use_cache", "output_past",
    "tie_word_embeddings", "scale_decoder_outputs", "n_positions", "task_specific_params",
    "gradient_checkpointing", "pad_token_id", "eos_token_id", "bos_token_id", "sep_token_id",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
))


@dataclasses.dataclass(frozen=True)
class T5Config(SerializableConfig):
    """transformers' T5Config names and defaults (the defaults are t5-small, v1.0)."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    attention: str = "xla"

    def __post_init__(self):
        check_field_types(self)
        parts = self.feed_forward_proj.split("-")
        if not (len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")) \
                or parts[-1] not in ACTIVATIONS:
            raise ValueError(f"T5Config.feed_forward_proj: unsupported {self.feed_forward_proj!r}; "
                             f"write NAME or gated-NAME with NAME one of {', '.join(ACTIVATIONS)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"T5Config.attention: unknown implementation {self.attention!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"T5Config.relative_attention_num_buckets: need at least 4, got "
                             f"{self.relative_attention_num_buckets}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self):
        name = self.feed_forward_proj.split("-")[-1]
        return ACTIVATIONS["gelu_new" if self.feed_forward_proj == "gated-gelu" else name]

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], *, attention: str = "xla") -> "T5Config":
        """From a transformers T5 `config.json` dict. Keys starting with `_` are metadata; keys
        that cannot change the encoder's output are ignored; any other key is an error."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention"}
        unknown = sorted(k for k in config
                         if not k.startswith("_") and k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"T5Config: unknown transformers config keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in config.items() if k in fields}, attention=attention)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """(query_length, key_length) bucket of each key position relative to each query position,
    bidirectional (the encoder's): half the buckets per direction, of which half are exact
    distances and half logarithmic bins up to `max_distance`. float32 as transformers computes
    it, so that distances at bin borders fall into the same bucket."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # Distances below max_exact take exact buckets; clipping them keeps log() finite where unused.
    logarithmic = max_exact + (
        np.log(np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)).astype(np.int64)
    logarithmic = np.minimum(logarithmic, half - 1)
    return buckets + np.where(distance < max_exact, distance, logarithmic)


class T5FeedForward(nn.Module):
    """wi -> activation -> wo, or, gated (v1.1), activation(wi_0 x) * wi_1 x -> wo; no biases."""
    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = lambda features, name: Dense(features, use_bias=False, dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=name)
        if c.is_gated:
            h = c.activation(dense(c.d_ff, "wi_0")(x)) * dense(c.d_ff, "wi_1")(x)
        else:
            h = c.activation(dense(c.d_ff, "wi")(x))
        return dense(c.d_model, "wo")(h)


class T5Block(nn.Module):
    """x + attention(norm(x), position bias), then x + feed_forward(norm(x))."""
    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        c = self.config
        norm = lambda name: RMSNorm(c.layer_norm_epsilon, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=name)
        x = x + Attention(c.num_heads, head_dim=c.d_kv, out_features=c.d_model,
                          names=("q", "k", "v", "o"), use_bias=(False,) * 4, scale=1.0,
                          implementation=c.attention, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="attention")(
            norm("attention_norm")(x), bias=position_bias)
        return x + T5FeedForward(c, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="feed_forward")(norm("feed_forward_norm")(x))


class T5EncoderModel(nn.Module):
    """ids (B, L) int32 -> last_hidden_state (B, L, d_model), after the final norm. No attention
    mask: SD3's and Flux's pipelines attend to the padding too."""
    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(1.0), name="shared")(input_ids)
        length = input_ids.shape[1]
        buckets = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="relative_attention_bias")
        position_bias = jnp.transpose(table(jnp.asarray(buckets, jnp.int32)), (2, 0, 1))[None]
        block = nn.remat(T5Block) if self.remat else T5Block
        for i in range(c.num_layers):
            x = block(c, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"blocks_{i}")(x, position_bias)
        return RMSNorm(c.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="final_norm")(x)
