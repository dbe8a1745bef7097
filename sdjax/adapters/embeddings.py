"""Textual-inversion embeddings: vectors for new prompt tokens, read without torch and appended to
the text encoders' token tables, as diffusers' `load_textual_inversion` and the WebUI use them.

Files (`.safetensors`; pickles — `.pt`, `.bin`, `.ckpt` — are refused with the command that
converts them):
- WebUI / kohya: one tensor `emb_params`, `string_to_param.*` (a flattened WebUI `.pt`) or `*`,
  of shape (vectors, width) or (width,). The token is the file's name without its extension.
- diffusers (`learned_embeds.safetensors`): one tensor keyed by its token, which is the token.
- SDXL: `clip_l` (for text_encoder) and `clip_g` (for text_encoder_2), the same number of vectors
  (other tensors beside them are ignored, as the WebUI ignores them).
A `token` given by the caller replaces the file's. A token T of n vectors becomes n new ids, named
T, T_1, ..., T_{n-1} in the tokenizer (diffusers' names, ids 49408, ... after the vocabulary); T in
a prompt stands for all n (`text.tokenizer`), with its emphasis on each, and never straddles two
75-token chunks (`text.prompts.tokenize_weighted`).

A folder (`--embeddings_dir`) means every `.safetensors` file in it and its subfolders; other files
(previews, notes) are ignored. A pickle there is refused only when it has no `.safetensors` file of
the same name beside it. A folder's embeddings made for another model (SD 1.x vectors beside SDXL
ones, as WebUI users keep them) are skipped with a warning, as the WebUI skips them; a file named
directly must fit.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np
from absl import logging

from sdjax.adapters.network import AdapterError
from sdjax.text.prompts import CHUNK_TOKENS
from sdjax.text.tokenizer import clean_text, vector_names
from sdjax.weights.common import SafetensorsFile, aligned_array
from sdjax.weights.pretrained import Pretrained
from sdjax.weights.single_file import PICKLE_EXTENSIONS, pickle_refusal_message

EMBEDDING_SUFFIX = ".safetensors"
# Single-tensor keys of WebUI / kohya files, whose token is the file name.
WEBUI_KEYS = ("emb_params", "*")
WEBUI_PARAM_PREFIX, WEBUI_TOKEN_PREFIX = "string_to_param.", "string_to_token."
SDXL_KEYS = ("clip_l", "clip_g")  # text_encoder, text_encoder_2
# A WebUI .pt keeps its vectors under string_to_param; a diffusers .bin is already {token: vectors}.
_CONVERT_SELECT = ("sd = {'emb_params': next(iter(sd['string_to_param'].values()))} "
                   "if 'string_to_param' in sd else sd")


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One file's token and its vectors: one (vectors, width) float32 table per text encoder it
    serves (SDXL files: text_encoder's, then text_encoder_2's)."""
    token: str
    vectors: tuple[np.ndarray, ...]
    source: str

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def names(self) -> list[str]:
        """The tokenizer entries it adds."""
        return vector_names(self.token, self.num_vectors)


def read_embedding(path: str | os.PathLike, token: Optional[str] = None) -> Embedding:
    """One embedding file, in any of the layouts the module docstring lists."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_EXTENSIONS:
        raise AdapterError(pickle_refusal_message(
            path, f"a {suffix} embedding is a pickle", select=_CONVERT_SELECT))
    if suffix != EMBEDDING_SUFFIX:
        raise AdapterError(f"{path}: not an embedding file (sdjax reads textual-inversion "
                           f"embeddings from {EMBEDDING_SUFFIX} files)")
    file = SafetensorsFile(path)
    keys = sorted(k for k in file if not k.startswith(WEBUI_TOKEN_PREFIX))
    file_token = None
    if all(key in keys for key in SDXL_KEYS):  # other tensors ignored, as by the WebUI
        tables = tuple(_table(file, key) for key in SDXL_KEYS)
        if tables[0].shape[0] != tables[1].shape[0]:
            raise AdapterError(f"{path}: clip_l has {tables[0].shape[0]} vectors but clip_g has "
                               f"{tables[1].shape[0]}; an SDXL embedding needs the same number")
    elif len(keys) == 1:
        tables = (_table(file, keys[0]),)
        if keys[0] not in WEBUI_KEYS and not keys[0].startswith(WEBUI_PARAM_PREFIX):
            file_token = keys[0]  # diffusers: {token: vectors}
    else:
        raise AdapterError(
            f"{path}: not a textual-inversion embedding: keys {keys}; expected one tensor "
            f"(emb_params, string_to_param.*, or a diffusers token) or clip_l and clip_g (SDXL)")
    if token is None:
        stem = os.path.splitext(os.path.basename(path))[0]
        token = file_token if file_token is not None else stem
    if not clean_text(token).strip():
        raise AdapterError(f"{path}: the token {token!r} is empty; name the file or pass a token")
    return Embedding(token=token, vectors=tables, source=path)


def _table(file: SafetensorsFile, key: str) -> np.ndarray:
    where = f"{file.name}: tensor {key!r}"
    shape = file.shape(key)
    if len(shape) not in (1, 2) or 0 in shape:
        raise AdapterError(f"{where} has shape {shape}; expected (vectors, width) or (width,)")
    array = file[key]
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise AdapterError(f"{where} holds {array.dtype} values, not floating point vectors")
    table = np.asarray(array, np.float32).reshape(-1, shape[-1])
    if table.shape[0] > CHUNK_TOKENS:
        raise AdapterError(f"{where} has {table.shape[0]} vectors; a prompt chunk holds at most "
                           f"{CHUNK_TOKENS}")
    if not np.all(np.isfinite(table)):
        raise AdapterError(f"{where} holds NaN or infinite values")
    return table


def embedding_files(folder: str | os.PathLike) -> list[str]:
    """The embedding files of a folder and its subfolders, sorted; a pickle with no `.safetensors`
    file of the same name beside it is refused (as `read_embedding` refuses it)."""
    folder = os.fspath(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        stems = {os.path.splitext(f)[0] for f in files if f.lower().endswith(EMBEDDING_SUFFIX)}
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            suffix = suffix.lower()
            if suffix == EMBEDDING_SUFFIX or (suffix in PICKLE_EXTENSIONS and stem not in stems):
                found.append(os.path.join(root, name))
    return found


def with_embeddings(model: Pretrained, paths: Sequence[str | os.PathLike], *,
                    tokens: Optional[Sequence[Optional[str]]] = None) -> Pretrained:
    """A new `Pretrained` whose tokenizers know the embeddings' tokens and whose text encoders'
    token tables end with their vectors; `model` itself is left as it was.

    `paths` are embedding files or folders of them; `tokens[i]`, if given and not None, is the
    token of `paths[i]` (a file, not a folder) instead of the file's own. A token that the
    tokenizer already reads as one id (a word of the vocabulary, or an embedding loaded before)
    or that two files share is an error naming both.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    tokens = [None] * len(paths) if tokens is None else list(tokens)
    if len(tokens) != len(paths):
        raise AdapterError(f"{len(tokens)} tokens for {len(paths)} embedding paths: give one "
                           f"token (or None) per path")
    embeddings = []
    for path, token in zip(paths, tokens):
        if os.path.isdir(path):
            if token is not None:
                raise AdapterError(f"{path}: a folder of embeddings takes its tokens from its "
                                   f"files; token {token!r} can only name a file's")
            for file in embedding_files(path):
                embedding = read_embedding(file)
                mismatch = _mismatch(embedding, model)
                if mismatch:
                    logging.warning("skipping %s", mismatch)
                else:
                    embeddings.append(embedding)
        elif os.path.isfile(path):
            embeddings.append(read_embedding(path, token))  # a misfit is refused when added
        else:
            raise AdapterError(f"{path}: no such embedding file or folder")
    return add_embeddings(model, embeddings)


def add_embeddings(model: Pretrained, embeddings: Sequence[Embedding]) -> Pretrained:
    """`with_embeddings` for embeddings already in memory (read from files, or being trained):
    a new `Pretrained` whose tokenizers know their tokens and whose token tables end with their
    vectors, the same checks applied."""
    for embedding in embeddings:
        mismatch = _mismatch(embedding, model)
        if mismatch:
            raise AdapterError(mismatch)
    _check_tokens(embeddings, model)
    text_configs, tokenizers = list(model.text_configs), list(model.tokenizers)
    params = dict(model.params)
    for index, name in enumerate(model.text_encoder_names if embeddings else ()):
        tokenizer = tokenizers[index]
        encoder = dict(params[name])
        table = np.asarray(encoder["token_embedding"]["embedding"])
        if table.shape[0] != len(tokenizer):
            raise AdapterError(f"{name}: its token table has {table.shape[0]} rows but its "
                               f"tokenizer has {len(tokenizer)} tokens, so new ids would not "
                               f"reach new rows")
        rows = np.concatenate([table] + [e.vectors[index].astype(table.dtype) for e in embeddings])
        encoder["token_embedding"] = {**encoder["token_embedding"],
                                      "embedding": aligned_array(rows, table.dtype, rows.shape)}
        params[name] = encoder
        tokenizers[index] = tokenizer.with_added_tokens(
            {e.token: e.num_vectors for e in embeddings})
        text_configs[index] = dataclasses.replace(text_configs[index], vocab_size=rows.shape[0])
    for e in embeddings:
        logging.info("textual inversion: %r (%d vectors) from %s", e.token, e.num_vectors, e.source)
    return dataclasses.replace(model, text_configs=tuple(text_configs),
                               tokenizers=tuple(tokenizers), params=params)


def _mismatch(embedding: Embedding, model: Pretrained) -> Optional[str]:
    """Why `embedding` cannot serve `model` (wrong number of text encoders or widths), or None."""
    names = model.text_encoder_names
    if len(embedding.vectors) != len(names):
        kind = ("an SDXL embedding (clip_l, clip_g)" if len(embedding.vectors) == 2
                else "one table of vectors")
        return (f"{embedding.source}: {kind} does not fit a model with {len(names)} text "
                f"encoder(s) ({model.family}); SDXL embeddings hold clip_l and clip_g")
    for name, config, vectors in zip(names, model.text_configs, embedding.vectors):
        if vectors.shape[1] != config.hidden_size:
            return (f"{embedding.source}: vectors of width {vectors.shape[1]} do not fit {name}, "
                    f"whose width is {config.hidden_size}")
    return None


def _check_tokens(embeddings: Sequence[Embedding], model: Pretrained) -> None:
    """Every name an embedding adds must be new: to the tokenizers and to the other files."""
    taken: dict[str, Embedding] = {}
    for embedding in embeddings:
        for name in embedding.names:
            key = clean_text(name)
            if key in taken:
                other = taken[key]
                raise AdapterError(f"{embedding.source}: token {name!r} clashes with "
                                   f"{other.token!r} of {other.source}")
            for tokenizer in model.tokenizers:
                clash = tokenizer.token_in_use(name)
                if clash:
                    raise AdapterError(f"{embedding.source}: token {name!r} is already {clash}; "
                                       f"rename the file or pass a token")
            taken[key] = embedding
    # T's vectors are found by name (T_1, T_2, ...), so T_n must not be another file's token.
    for embedding in embeddings:
        next_name = vector_names(embedding.token, embedding.num_vectors + 1)[-1]
        following = taken.get(clean_text(next_name))
        if following is not None:
            raise AdapterError(
                f"{following.source}: token {following.token!r} would read as vector "
                f"{embedding.num_vectors + 1} of {embedding.token!r} ({embedding.source}), "
                f"diffusers' naming of multi-vector tokens; rename one file")
