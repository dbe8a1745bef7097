"""The CLIP byte-level BPE tokenizer, offline, giving the same ids as transformers' `CLIPTokenizer`.

Text is cleaned as transformers 5 does (NFC, whitespace runs -> one space, lowercase), split with
CLIP's pattern, byte-encoded and merged by BPE rank. Special tokens written literally in a prompt
(`<|endoftext|>`, and the pad token, e.g. SD 2.x's `!`) are matched before cleaning and become
their own ids, as they do in the reference.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import unicodedata
from typing import Mapping, Optional, Sequence

import numpy as np
import regex

from sdjax import ASSETS_DIR

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB = os.path.join(ASSETS_DIR, "bpe_simple_vocab_16e6.txt.gz")
# 49152 - 256 - 2 merges in the OpenAI file; the rest of its lines are unused.
NUM_MERGES = 48894

# CLIP's pre-tokenizer pattern (transformers' CLIPTokenizer / tokenizer.json).
_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# The byte-level stage splits each piece again with GPT-2's pattern; that only matters for the
# special-token alternatives above when they are not literal special tokens (e.g. upper case).
_BYTE_LEVEL_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by CLIP's vocabulary."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    """transformers 5's CLIP normaliser: NFC, whitespace runs -> " ", lowercase."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # The reference lowercases char by char; str.lower() would turn a word-final Σ into ς.
    return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


class CLIPTokenizer:
    """CLIP BPE tokenizer. `__call__` pads to `max_length` ids: BOS, text, EOS, pad...

    Build with `default()` (the shipped OpenAI vocabulary) or `from_pretrained(folder)`.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 pad_token: str = EOS_TOKEN, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 unk_token: str = EOS_TOKEN, special_tokens: Sequence[str] = (),
                 name: str = "<vocab>"):
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {tuple(pair): i for i, pair in enumerate(merges)}
        self.name = name
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                            ("unk", unk_token)):
            if token not in self.encoder:
                raise ValueError(f"{name}: {role} token {token!r} is not in the vocabulary")
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            bos_token, eos_token, pad_token, unk_token)
        specials = {bos_token, eos_token, pad_token, unk_token, *special_tokens}
        missing = [t for t in specials if t not in self.encoder]
        if missing:
            raise ValueError(f"{name}: special tokens not in the vocabulary: {missing}")
        # Longest first, so the alternation is leftmost-longest like the reference's matcher.
        self._special = regex.compile("|".join(
            regex.escape(t) for t in sorted(specials, key=len, reverse=True)))
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def default(cls, *, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
        """The OpenAI CLIP vocabulary shipped in sdjax/assets. SD 1.x pads with `<|endoftext|>`;
        pass `pad_token="!"` for SD 2.x / OpenCLIP."""
        return cls(*_shipped_vocab(), pad_token=pad_token, name=DEFAULT_VOCAB)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *,
                        pad_token: Optional[str] = None) -> "CLIPTokenizer":
        """A tokenizer folder: `tokenizer.json` (transformers 5 / tokenizers) or `vocab.json` +
        `merges.txt` (+ `special_tokens_map.json`). The pad token is the folder's unless given."""
        folder = os.fspath(folder)
        settings = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            settings.update(_read_json(os.path.join(folder, fname), optional=True) or {})
        tokens = {role: _token_content(settings.get(f"{role}_token"))
                  for role in ("bos", "eos", "pad", "unk")}
        extra = [_token_content(t) for t in settings.get("additional_special_tokens", [])]
        extra += [_token_content(t) for t in
                  (settings.get("added_tokens_decoder") or {}).values() if t.get("special", True)]
        vocab_json = os.path.join(folder, "vocab.json")
        merges_txt = os.path.join(folder, "merges.txt")
        tokenizer_json = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
            name = vocab_json
            vocab = _read_json(vocab_json)
            merges = _read_merges_txt(merges_txt)
        elif os.path.isfile(tokenizer_json):
            name = tokenizer_json
            spec = _read_json(tokenizer_json)
            try:
                model = spec["model"]
                vocab = model["vocab"]
                merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                          for m in model["merges"]]
            except (KeyError, TypeError) as err:
                raise ValueError(f"{tokenizer_json}: not a BPE tokenizer file ({err!r})") from None
            extra += [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
        else:
            raise FileNotFoundError(
                f"{folder}: no tokenizer files (need vocab.json + merges.txt, or tokenizer.json)")
        if pad_token is not None:
            tokens["pad"] = pad_token
        return cls(vocab, merges,
                   **{f"{role}_token": tok for role, tok in tokens.items() if tok is not None},
                   special_tokens=[t for t in extra if t], name=name)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt and special_tokens_map.json: the folder layout of the SD
        checkpoints people have, which `from_pretrained` and transformers both read."""
        os.makedirs(folder, exist_ok=True)
        merges = sorted(self.ranks, key=self.ranks.get)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.encoder, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                    "pad_token": self.pad_token, "unk_token": self.unk_token}
        with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(specials, f, indent=2)
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({**specials, "model_max_length": 77, "do_lower_case": True,
                       "tokenizer_class": "CLIPTokenizer"}, f, indent=2)

    # -- ids ---------------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int:
        return self.encoder[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.encoder[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`: no BOS/EOS, no truncation (long prompts are chunked by callers)."""
        ids: list[int] = []
        start = 0
        for match in self._special.finditer(text):
            ids += self._encode_plain(text[start:match.start()])
            ids.append(self.encoder[match.group()])
            start = match.end()
        ids += self._encode_plain(text[start:])
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
        """(B, max_length) int32: BOS, the first max_length-2 text ids, EOS, then pad ids."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        out = np.full((len(texts), max_length), self.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id, *self.encode(text)[:max_length - 2], self.eos_token_id]
            out[row, :len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        text = "".join(self.decoder[int(i)] for i in ids
                       if not (skip_special_tokens and int(i) in specials))
        text = text.replace("</w>", self._byte_encoder[ord(" ")])
        raw = bytes(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").strip()

    # -- BPE ---------------------------------------------------------------------------------

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            for word in _BYTE_LEVEL_SPLIT.findall(piece):
                ids += self._bpe(word)
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
        parts = list(chars[:-1]) + [chars[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        unk = self.encoder[self.unk_token]
        ids = tuple(self.encoder.get(p, unk) for p in parts)
        self._cache[word] = ids
        return ids


@functools.lru_cache(maxsize=1)
def _shipped_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_json(path: str, optional: bool = False):
    if optional and not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from None


def _read_merges_txt(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = []
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: expected two symbols, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _token_content(token) -> Optional[str]:
    if isinstance(token, dict):
        return token.get("content")
    return token
