"""transformers T5 encoder checkpoints -> sdjax `T5EncoderModel` params.

Key layouts accepted: a `T5EncoderModel` state dict (`shared.weight`, `encoder.block.N...`,
`encoder.final_layer_norm.weight`), the same without the `encoder.` prefix, the embedding stored
as `shared.weight`, `encoder.embed_tokens.weight` or both (tied: `shared.weight` is read), and
a whole `T5ForConditionalGeneration` (its decoder and LM head are skipped). Float8 weights (some
SD3.5 bundles) are upcast as they are read.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional

import jax.numpy as jnp

from sdjax.models.t5 import T5Config, T5EncoderModel
from sdjax.weights.clip import open_transformers_weights, read_config_json
from sdjax.weights.common import (TensorSource, WeightsError, abstract_params, convert_state_dict,
                                  regex_renamer)

SHARED = "shared.weight"
EMBED_TOKENS = "encoder.embed_tokens.weight"
_BLOCK = r"encoder\.block\.(\d+)\.layer\."
# transformers name (with the `encoder.` prefix) -> sdjax path.
T5_RULES = (
    (re.escape(SHARED), "shared/embedding"),
    (re.escape(EMBED_TOKENS), "shared/embedding"),
    (r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
     "relative_attention_bias/embedding"),
    (_BLOCK + r"0\.SelfAttention\.([qkvo])\.weight", r"blocks_\1/attention/\2/kernel"),
    (_BLOCK + r"0\.layer_norm\.weight", r"blocks_\1/attention_norm/scale"),
    (_BLOCK + r"1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", r"blocks_\1/feed_forward/\2/kernel"),
    (_BLOCK + r"1\.layer_norm\.weight", r"blocks_\1/feed_forward_norm/scale"),
    (r"encoder\.final_layer_norm\.weight", "final_norm/scale"),
)
_rename = regex_renamer(T5_RULES)
# A whole encoder-decoder's other half.
_NOT_ENCODER = (r"decoder\..*", r"lm_head\.weight")


def _renamer(source: TensorSource) -> Callable[[str], Optional[str]]:
    """Renamer for `source`'s keys, with or without `encoder.`; of a tied pair of embeddings,
    `shared.weight` is read and `encoder.embed_tokens.weight` skipped."""
    tied = SHARED in source

    def rename(key: str) -> Optional[str]:
        if key != SHARED and not key.startswith("encoder."):
            key = "encoder." + key
        if tied and key == EMBED_TOKENS:
            return None
        return _rename(key)

    return rename


def t5_shapes(config: T5Config) -> dict:
    """Shapes and dtypes of `T5EncoderModel(config)`'s params (nothing allocated)."""
    return abstract_params(T5EncoderModel(config), jnp.zeros((1, 1), jnp.int32))


def t5_params(source: TensorSource, config: T5Config, dtype=None) -> dict:
    """Params for `T5EncoderModel(config)` from a transformers T5 state dict. `dtype` None gives
    float32 (float8 and 16-bit files too)."""
    return convert_state_dict(source, _renamer(source), t5_shapes(config), what="T5 encoder",
                              dtype=dtype, ignore=_NOT_ENCODER)


def load_t5(folder: str | os.PathLike, dtype=None, *,
            attention: str = "xla") -> tuple[T5Config, dict]:
    """(config, params) of a transformers T5EncoderModel folder (a diffusers `text_encoder_3` /
    `text_encoder_2`): config.json + model.safetensors, or the shards listed in
    model.safetensors.index.json."""
    raw = read_config_json(folder)
    try:
        config = T5Config.from_transformers(raw, attention=attention)
    except ValueError as err:
        raise WeightsError(f"{os.path.join(os.fspath(folder), 'config.json')}: {err}") from None
    return config, t5_params(open_transformers_weights(folder), config, dtype)


def t5_config_from_source(source: TensorSource, *, attention: str = "xla") -> T5Config:
    """The config of the T5 encoder in `source` (transformers names, with or without `encoder.`),
    from its tensors' shapes: what a single file bundling T5 (SD3.5's `text_encoders.t5xxl.
    transformer.`, prefix stripped by the caller) does not say otherwise. The feed-forward is
    "gated-gelu" (v1.1) when it has wi_0/wi_1, else "relu" (v1.0); the maximum distance of the
    position buckets and the norms' epsilon, which no shape shows, are T5's own (128, 1e-6)."""
    keys = {("" if k == SHARED or k.startswith("encoder.") else "encoder.") + k: k for k in source}

    def shape(key: str) -> tuple[int, ...]:
        if key not in keys:
            raise WeightsError(f"{source.name}: not a T5 encoder: no {key!r} (looked with and "
                               f"without the 'encoder.' prefix)")
        return tuple(source.shape(keys[key]))

    embedding = SHARED if SHARED in keys else EMBED_TOKENS
    vocab_size, d_model = shape(embedding)
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    layers = {int(m.group(1)) for m in map(re.compile(r"encoder\.block\.(\d+)\.").match, keys) if m}
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi")
                 + ".weight")[0]
    if inner % heads:
        raise WeightsError(f"{source.name}: T5 attention width {inner} is not a multiple of the "
                           f"{heads} heads of relative_attention_bias")
    if layers != set(range(len(layers))):
        raise WeightsError(f"{source.name}: T5 blocks {sorted(layers)} are not numbered 0..N-1")
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
                    num_layers=len(layers), num_heads=heads,
                    relative_attention_num_buckets=buckets,
                    feed_forward_proj="gated-gelu" if gated else "relu", attention=attention)
