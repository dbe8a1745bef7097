"""Textual-inversion training (Gal et al. 2022, "An Image is Worth One Word"), as diffusers'
`examples/textual_inversion` trains it, on the same loop, train step and objective as full
fine-tuning.

A new token T of n vectors is added to every text encoder's tokenizer the way
`adapters.embeddings.add_embeddings` adds a file's (ids T, T_1, ..., T_{n-1} after the vocabulary,
T in a caption expanding to all n), each vector starting as the embedding of one `init_word`.
Those n rows per text encoder are the only trainable params: the param group "embeddings",
{text encoder name: (n, width) float32}. The models, their token tables included, stay frozen
param groups (no optimizer state, no EMA, not in checkpoints); each step joins each encoder's base
table and its trained rows into the table the text encoder reads, so the base rows are never
written and only the new rows receive gradients. (diffusers instead trains the whole table and
copies the old rows back after every step; the result is the same rows, without AdamW's moments
for 49,408 rows that never move.)

Exports, the token's vectors in two formats:
- `<token>.safetensors`, the WebUI's (and kohya's) format: `emb_params` (n, width), or `clip_l` and
  `clip_g` for SDXL; its token is its file name, as the WebUI and `with_embeddings` read it;
- diffusers' `learned_embeds.safetensors` {token: (n, width)} (SDXL: `learned_embeds_2.safetensors`
  for text_encoder_2, as diffusers' textual_inversion_sdxl.py writes them), which
  `load_textual_inversion` reads.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from sdjax.adapters.embeddings import SDXL_KEYS, WEBUI_KEYS, Embedding, add_embeddings
from sdjax.runs import write_atomically
from sdjax.text.tokenizer import clean_text
from sdjax.training.step import WrappingTask
from sdjax.weights.pretrained import Pretrained

GROUP = "embeddings"
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")


@dataclasses.dataclass(frozen=True)
class TextualInversionConfig:
    """diffusers' `--placeholder_token` (`token`), `--num_vectors` and `--initializer_token`
    (`init_word`: one token of every text encoder's vocabulary)."""
    token: str
    init_word: str
    num_vectors: int = 1

    def __post_init__(self):
        if not isinstance(self.token, str) or not clean_text(self.token).strip():
            raise ValueError(f"textual_inversion.token must name the new token, got "
                             f"{self.token!r}")
        # The WebUI file is named after the token (its only record of it).
        if any(c in self.token for c in ("/", "\\", "\0")) or self.token.strip() in (".", ".."):
            raise ValueError(f"textual_inversion.token {self.token!r} cannot name a file; the "
                             f"WebUI-format export is <token>.safetensors")
        if not isinstance(self.init_word, str) or not self.init_word.strip():
            raise ValueError("textual_inversion.init_word must be a word of the vocabulary (the "
                             "new vectors start as its embedding), got "
                             f"{self.init_word!r}")
        if isinstance(self.num_vectors, bool) or not isinstance(self.num_vectors, int) or \
                self.num_vectors < 1:
            raise ValueError(f"textual_inversion.num_vectors must be an integer >= 1, got "
                             f"{self.num_vectors!r}")


def textual_inversion_config(fields: Mapping[str, Any], exclude: Sequence[str] = ()
                             ) -> TextualInversionConfig:
    """A TextualInversionConfig from a config's `textual_inversion` fields but `exclude`."""
    known = {f.name for f in dataclasses.fields(TextualInversionConfig)}
    unknown = sorted(set(fields) - known - set(exclude))
    if unknown:
        raise ValueError(f"textual_inversion: unknown settings {unknown}; known: {sorted(known)}")
    return TextualInversionConfig(**{k: v for k, v in fields.items() if k in known})


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: static data of a jitted task
class Inversion:
    """A token being learned: the text encoders it has vectors in, and how many rows each one's
    base table holds (its first new id)."""
    token: str
    num_vectors: int
    encoders: tuple[str, ...]
    base_rows: tuple[int, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        return (GROUP,)

    def split(self, params: Mapping[str, Any]) -> dict:
        """The params of a model that knows the token (`make_inversion`'s) as a train state holds
        them: each text encoder with its base table only, and the new rows, as float32 masters,
        in the group "embeddings"."""
        out, rows = dict(params), {}
        for name, base in zip(self.encoders, self.base_rows):
            table = params[name]["token_embedding"]["embedding"]
            if table.shape[0] != base + self.num_vectors:
                raise ValueError(f"{name}: token table of {table.shape[0]} rows; expected "
                                 f"{base} + {self.num_vectors} for {self.token!r}")
            out[name] = _with_table(params[name], table[:base])
            rows[name] = np.asarray(table[base:], np.float32)
        out[GROUP] = rows
        return out

    def inference_params(self, params: Mapping[str, Any]) -> dict:
        """A `Pretrained.params`-shaped dict from a train state's params: each text encoder's
        table is its base rows followed by the trained ones (in the table's dtype), as
        `with_embeddings` would lay out the exported file."""
        out = {name: value for name, value in params.items() if name != GROUP}
        for name in self.encoders:
            table = params[name]["token_embedding"]["embedding"]
            rows = params[GROUP][name].astype(table.dtype)
            out[name] = _with_table(params[name], jnp.concatenate([table, rows]))
        return out

    def vectors(self, params: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
        """The trained vectors (host, float32), one (n, width) table per text encoder."""
        return tuple(np.asarray(params[GROUP][name], np.float32) for name in self.encoders)


def _with_table(encoder: Mapping[str, Any], table) -> dict:
    return {**encoder, "token_embedding": {**encoder["token_embedding"], "embedding": table}}


def init_word_ids(model: Pretrained, init_word: str) -> tuple[int, ...]:
    """The id of `init_word` in each of `model`'s tokenizers; an error unless it is one token."""
    ids = []
    for name, tokenizer in zip(model.text_encoder_names, model.tokenizers):
        found = tokenizer.encode(init_word)
        if len(found) != 1:
            pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in found]
            raise ValueError(f"textual_inversion.init_word {init_word!r} is {len(found)} tokens "
                             f"{pieces} for {name}'s tokenizer; it must be one (diffusers' "
                             f"initializer_token)")
        ids.append(found[0])
    return tuple(ids)


def make_inversion(model: Pretrained, config: TextualInversionConfig
                   ) -> tuple[Inversion, Pretrained]:
    """The token `config` describes, and `model` with it added (`add_embeddings`): its tokenizers
    read the token as its n new ids and its token tables end with n copies of the init word's
    embedding (diffusers' initialisation). The returned model is what a run's data pipeline,
    objective and samplers use; `Inversion.split` turns its params into the train state's."""
    for name, tokenizer in zip(model.text_encoder_names, model.tokenizers):
        clash = tokenizer.token_in_use(config.token)
        if clash:
            raise ValueError(f"textual_inversion.token {config.token!r} is already {clash} "
                             f"({name}); a learned token must be new")
    ids = init_word_ids(model, config.init_word)
    tables = [np.asarray(model.params[name]["token_embedding"]["embedding"])
              for name in model.text_encoder_names]
    vectors = tuple(np.repeat(table[i][None].astype(np.float32), config.num_vectors, axis=0)
                    for table, i in zip(tables, ids))
    embedding = Embedding(token=config.token, vectors=vectors,
                          source=f"textual_inversion.token {config.token!r}")
    inversion = Inversion(token=config.token, num_vectors=config.num_vectors,
                          encoders=tuple(model.text_encoder_names),
                          base_rows=tuple(t.shape[0] for t in tables))
    return inversion, add_embeddings(model, [embedding])


def check_groups(groups: dict) -> dict:
    """The optimizer groups of a textual-inversion run: "embeddings" must be there and trained,
    every model frozen."""
    trained = [name for name, group in groups.items()
               if name != GROUP and not group.get("frozen", False)]
    if trained:
        raise ValueError(f"optimizer.groups trains {trained}, but a textual-inversion run "
                         f"(textual_inversion.use) trains only the new token's vectors, the "
                         f"group {GROUP!r}; the models stay frozen")
    if GROUP not in groups or groups[GROUP].get("frozen", False):
        raise ValueError(f"optimizer.groups has no trained group {GROUP!r}: give the new "
                         f"token's vectors their learning rate")
    return groups


@dataclasses.dataclass(frozen=True, eq=False)
class TextualInversionTask(WrappingTask):
    """`task` (the latent-diffusion objective) run with `inversion`'s trained rows in the frozen
    models' token tables."""
    task: Any
    inversion: Inversion

    def loss(self, params: dict, batch: dict, key):
        return self.task.loss(self.inversion.inference_params(params), batch, key)


def export_files(inversion: Inversion, params: Mapping[str, Any], directory: str,
                 metadata: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Write the token's vectors (from `params`' group "embeddings", host arrays) as
    `<directory>/<token>.safetensors` (the WebUI's format) and diffusers' `learned_embeds*.
    safetensors`. Returns {"webui": path, "diffusers": path[, "diffusers_2": path]}."""
    os.makedirs(directory, exist_ok=True)
    vectors = inversion.vectors(params)
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    webui = (dict(zip(SDXL_KEYS, vectors)) if len(vectors) == 2
             else {WEBUI_KEYS[0]: vectors[0]})
    paths = {"webui": os.path.join(directory, inversion.token + ".safetensors")}
    write_atomically(paths["webui"], safetensors.numpy.save(
        webui, metadata={"name": inversion.token, **metadata}))
    for index, (file, table) in enumerate(zip(DIFFUSERS_FILES, vectors)):
        key = "diffusers" if index == 0 else f"diffusers_{index + 1}"
        paths[key] = os.path.join(directory, file)
        write_atomically(paths[key], safetensors.numpy.save({inversion.token: table},
                                                            metadata={"format": "pt"}))
    return paths


__all__ = ["GROUP", "Inversion", "TextualInversionConfig", "TextualInversionTask",
           "check_groups", "export_files", "init_word_ids", "make_inversion",
           "textual_inversion_config"]
