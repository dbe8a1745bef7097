"""CLIP: the text transformer (SD's prompt encoder), the vision transformer and the contrastive
model, numerically as transformers' CLIP. Covers OpenAI ViT-L/14 text (SD 1.x, quick-GELU),
OpenCLIP ViT-H/14 text (SD 2.x, GELU) and OpenCLIP bigG (SDXL's second encoder, projected)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from sdjax.models.layers import (ATTENTION_IMPLEMENTATIONS, Attention, Dense, SerializableConfig,
                                 check_field_types, einsum)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, used for keys a config.json omits.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512,
                      eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512)


def _check_tower(config) -> None:
    name = type(config).__name__
    if config.hidden_size % config.num_heads:
        raise ValueError(f"{name}: hidden_size {config.hidden_size} is not a multiple of "
                         f"num_heads {config.num_heads}")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{name}: unsupported hidden_act {config.hidden_act!r}; "
                         f"choose one of {', '.join(ACTIVATIONS)}")
    if config.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{name}: unknown attention {config.attention!r}; "
                         f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")


def _tower_from_transformers(config: Mapping[str, Any], section: str, defaults: Mapping[str, Any],
                             with_projection: Optional[bool], attention: str) -> tuple[dict, dict]:
    """The fields both towers read from a transformers `config.json` dict (the tower's own, or a
    CLIPModel's, whose `section` is then taken with the model's projection), and the dict with
    defaults filled in for the tower's other fields."""
    if section in config:
        tower = {**defaults, **config[section], "projection_dim": config.get("projection_dim", 512)}
        with_projection = True if with_projection is None else with_projection
    else:
        tower = {**defaults, **config}
        # transformers writes projection_dim into every CLIP config; only the architecture
        # says whether a projection layer exists.
        if with_projection is None:
            with_projection = any(a.endswith("WithProjection")
                                  for a in config.get("architectures") or ())
    fields = dict(hidden_size=tower["hidden_size"], intermediate_size=tower["intermediate_size"],
                  num_layers=tower["num_hidden_layers"], num_heads=tower["num_attention_heads"],
                  hidden_act=tower["hidden_act"], layer_norm_eps=tower["layer_norm_eps"],
                  projection_dim=tower["projection_dim"] if with_projection else None,
                  attention=attention)
    return fields, tower


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(SerializableConfig):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None  # None: no text_projection layer
    # Pooling position: the legacy value 2 means "argmax of the ids" (the EOS has the highest id
    # in OpenAI's vocabulary); any other value means "first position holding this id".
    eos_token_id: int = 49407
    attention: str = "xla"

    def __post_init__(self):
        check_field_types(self)
        _check_tower(self)

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], *, with_projection: Optional[bool] = None,
                          attention: str = "xla") -> "CLIPTextConfig":
        """From a transformers `config.json` dict (CLIPTextModel[WithProjection], or a CLIPModel,
        whose text tower is then taken with the model's projection)."""
        fields, text = _tower_from_transformers(config, "text_config", _TEXT_DEFAULTS,
                                                with_projection, attention)
        return cls(vocab_size=text["vocab_size"],
                   max_position_embeddings=text["max_position_embeddings"],
                   eos_token_id=text["eos_token_id"], **fields)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(SerializableConfig):
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None  # None: no visual_projection layer
    attention: str = "xla"

    def __post_init__(self):
        check_field_types(self)
        _check_tower(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple "
                             f"of patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], *, with_projection: Optional[bool] = None,
                          attention: str = "xla") -> "CLIPVisionConfig":
        """From a transformers `config.json` dict (CLIPVisionModel[WithProjection] or CLIPModel)."""
        fields, vision = _tower_from_transformers(config, "vision_config", _VISION_DEFAULTS,
                                                  with_projection, attention)
        return cls(image_size=vision["image_size"], patch_size=vision["patch_size"],
                   num_channels=vision["num_channels"], **fields)


@dataclasses.dataclass(frozen=True)
class CLIPConfig(SerializableConfig):
    """Both towers, each with its projection to the shared `projection_dim`."""
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07)

    def __post_init__(self):
        if self.text.projection_dim is None or self.text.projection_dim != self.vision.projection_dim:
            raise ValueError(f"CLIPConfig: both towers need the same projection_dim, got text "
                             f"{self.text.projection_dim}, vision {self.vision.projection_dim}")

    @property
    def projection_dim(self) -> int:
        return self.text.projection_dim

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], *, attention: str = "xla") -> "CLIPConfig":
        return cls(text=CLIPTextConfig.from_transformers(config, attention=attention),
                   vision=CLIPVisionConfig.from_transformers(config, attention=attention),
                   logit_scale_init_value=config.get("logit_scale_init_value", 2.6592))


@struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array        # (B, L, D), after the final layer norm
    hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer's output (no final norm)
    pooled_output: jax.Array            # (B, D), last_hidden_state at the EOS position
    text_embeds: Optional[jax.Array]    # (B, P) projected pooled output; None without projection


@struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array        # (B, 1 + patches, D), encoder output (not post-normed)
    hidden_states: tuple[jax.Array, ...]  # pre-layernormed embeddings, then each layer's output
    pooled_output: jax.Array            # (B, D), post-layernormed class token
    image_embeds: Optional[jax.Array]   # (B, P) projected pooled output; None without projection


@struct.dataclass
class CLIPOutput:
    logits_per_image: jax.Array  # (B_image, B_text)
    logits_per_text: jax.Array   # (B_text, B_image)
    text_embeds: jax.Array       # (B_text, P), unit norm
    image_embeds: jax.Array      # (B_image, P), unit norm
    text_output: CLIPTextOutput
    vision_output: CLIPVisionOutput


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        x = Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc1")(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    config: Any  # CLIPTextConfig or CLIPVisionConfig
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        c = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        x = x + Attention(c.num_heads, names=("q_proj", "k_proj", "v_proj", "out_proj"),
                          implementation=c.attention, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="self_attn")(
            norm(name="layer_norm1")(x), mask=mask, is_causal=self.causal)
        return x + CLIPMLP(c.intermediate_size, c.hidden_act, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="mlp")(norm(name="layer_norm2")(x))


def _encoder_layers(config, causal: bool, remat: bool, dtype, param_dtype) -> list:
    # Layers are created as a list attribute in setup, so flax names them layers_0, layers_1...
    layer = nn.remat(CLIPEncoderLayer) if remat else CLIPEncoderLayer
    return [layer(config, causal=causal, dtype=dtype, param_dtype=param_dtype)
            for _ in range(config.num_layers)]


class CLIPTextModel(nn.Module):
    """Token + position embeddings, causal pre-norm encoder, final layer norm, EOS pooling and
    (if `config.projection_dim`) the text projection. Input ids (B, L), L <= max positions."""
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  embedding_init=nn.initializers.normal(0.02))
        self.token_embedding = embed(c.vocab_size)
        self.position_embedding = embed(c.max_position_embeddings)
        self.layers = _encoder_layers(c, True, self.remat, self.dtype, self.param_dtype)
        self.final_layer_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                                             param_dtype=self.param_dtype)
        if c.projection_dim is not None:
            self.text_projection = Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype)

    def __call__(self, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> CLIPTextOutput:
        """`attention_mask` (B, L), 1 for real tokens, masks padded keys on top of the causal
        mask (Stable Diffusion passes none)."""
        c = self.config
        batch, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: {length} tokens exceed max_position_embeddings "
                             f"{c.max_position_embeddings}")
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        if c.eos_token_id == 2:
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = last[jnp.arange(batch), eos_position]
        text_embeds = self.text_projection(pooled) if c.projection_dim is not None else None
        return CLIPTextOutput(last_hidden_state=last, hidden_states=tuple(hidden_states),
                              pooled_output=pooled, text_embeds=text_embeds)

    def final_norm(self, hidden: jax.Array) -> jax.Array:
        return self.final_layer_norm(hidden)


def text_hidden_state(model: CLIPTextModel, params, output: CLIPTextOutput, clip_skip: int = 0,
                      *, apply_final_norm: bool = True) -> jax.Array:
    """The prompt context a U-Net sees: `hidden_states[-(clip_skip + 1)]`, final-normed or not.

    SD 1.x / 2.x: `clip_skip=k, apply_final_norm=True` (diffusers' clip_skip; 0 is
    `last_hidden_state`; SD 2.x's OpenCLIP checkpoints already drop their last layer).
    SDXL: `clip_skip=1 + k, apply_final_norm=False`, i.e. `hidden_states[-2]` raw by default.
    `params` are the text model's params (the tree under "params").
    """
    count = len(output.hidden_states)
    if not 0 <= clip_skip < count:
        raise ValueError(f"clip_skip must be in [0, {count - 1}] for a {count - 1}-layer "
                         f"text encoder, got {clip_skip}")
    if not apply_final_norm:
        return output.hidden_states[-(clip_skip + 1)]
    if clip_skip == 0:
        return output.last_hidden_state
    return model.apply({"params": params}, output.hidden_states[-(clip_skip + 1)],
                       method=CLIPTextModel.final_norm)


class CLIPVisionModel(nn.Module):
    """Patch conv + class token + positions, pre-layernorm, encoder, post-layernorm on the class
    token, and (if `config.projection_dim`) the visual projection. Pixels (B, H, W, C)."""
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        self.patch_embedding = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                                       strides=(c.patch_size, c.patch_size), padding="VALID",
                                       use_bias=False, dtype=self.dtype,
                                       param_dtype=self.param_dtype)
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(1.0),
                                          (c.hidden_size,), self.param_dtype)
        self.position_embedding = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype,
                                           param_dtype=self.param_dtype,
                                           embedding_init=nn.initializers.normal(0.02))
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        self.pre_layernorm = norm()
        self.layers = _encoder_layers(c, False, self.remat, self.dtype, self.param_dtype)
        self.post_layernorm = norm()
        if c.projection_dim is not None:
            self.visual_projection = Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                                              param_dtype=self.param_dtype)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        c = self.config
        want = (c.image_size, c.image_size, c.num_channels)
        if tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"CLIPVisionModel: pixel_values must be (B, {want[0]}, {want[1]}, "
                             f"{want[2]}) NHWC, got {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.astype(self.dtype))
        # Row-major (h, w) order, as PyTorch's flatten(2) of an NCHW map.
        patches = patches.reshape(batch, -1, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (batch, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        x = x + self.position_embedding(jnp.arange(c.num_positions))[None]
        x = self.pre_layernorm(x)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        pooled = self.post_layernorm(x[:, 0])
        image_embeds = self.visual_projection(pooled) if c.projection_dim is not None else None
        return CLIPVisionOutput(last_hidden_state=x, hidden_states=tuple(hidden_states),
                                pooled_output=pooled, image_embeds=image_embeds)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nn.Module):
    """Both towers and the learned temperature; logits are scaled cosine similarities."""
    config: CLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
        self.text_model = CLIPTextModel(self.config.text, **kw)
        self.vision_model = CLIPVisionModel(self.config.vision, **kw)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(self.config.logit_scale_init_value), (),
            self.param_dtype)

    def get_text_features(self, input_ids: jax.Array,
                          attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Projected pooled text features (B, P), not normalised (as transformers)."""
        return self.text_model(input_ids, attention_mask).text_embeds

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected pooled image features (B, P), not normalised (as transformers)."""
        return self.vision_model(pixel_values).image_embeds

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> CLIPOutput:
        text_output = self.text_model(input_ids, attention_mask)
        vision_output = self.vision_model(pixel_values)
        text_embeds = _unit(text_output.text_embeds)
        image_embeds = _unit(vision_output.image_embeds)
        scale = jnp.exp(self.logit_scale).astype(text_embeds.dtype)
        logits_per_text = einsum("td,id->ti", text_embeds, image_embeds) * scale
        return CLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds,
                          text_output=text_output, vision_output=vision_output)
