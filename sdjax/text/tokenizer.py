"""The CLIP byte-level BPE tokenizer, offline, giving the same ids as transformers' `CLIPTokenizer`.

The work is done by a `tokenizers.Tokenizer` (Rust) assembled as transformers 5 assembles CLIP's:
NFC, whitespace runs -> one space, lowercase; CLIP's split pattern, then the byte-level split; BPE
with `</w>` word ends. Special tokens written literally in a prompt (`<|endoftext|>`, and the pad
token, e.g. SD 2.x's `!`) are matched before normalisation and become their own ids, as they do in
the reference.

Added tokens (textual-inversion embeddings, `with_added_tokens`) follow diffusers: a token `T` of n
vectors is the added tokens `T`, `T_1`, ..., `T_{n-1}`, with ids after the vocabulary (49408, ...),
and `T` in a text becomes all n ids. They are matched after normalisation (so in any case) and as
whole words only: `T` inside a longer word is not `T` (as in the WebUI, which finds an embedding by
its name's BPE ids; diffusers would match it there too).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdjax import ASSETS_DIR

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_VOCAB = os.path.join(ASSETS_DIR, "bpe_simple_vocab_16e6.txt.gz")
# 49152 - 256 - 2 merges in the OpenAI file; the rest of its lines are unused.
NUM_MERGES = 48894

# transformers 5's CLIP pipeline (models/clip/tokenization_clip.py).
_NORMALIZER = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
          r"""[^\s\p{L}\p{N}]+""")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table; its order is CLIP's vocabulary order."""
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
    """The tokenizer's normaliser: NFC, whitespace runs -> " ", lowercase (char by char, so a
    word-final Σ becomes σ, as in the reference)."""
    return _NORMALIZER.normalize_str(text)


class CLIPTokenizer:
    """CLIP BPE tokenizer. `__call__` pads to `max_length` ids: BOS, text, EOS, pad...

    Build with `default()` (the shipped OpenAI vocabulary) or `from_pretrained(folder)`.
    `added_tokens` take the ids after the vocabulary's, in order; `len(tokenizer)` counts them,
    `vocab_size` does not (transformers' convention).
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 pad_token: str = EOS_TOKEN, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 unk_token: str = EOS_TOKEN, special_tokens: Sequence[str] = (),
                 added_tokens: Sequence[AddedToken] = (), name: str = "<vocab>"):
        # Plain tables, public as before; the Rust tokenizer below is built from them.
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
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
        try:
            self._tokenizer = _clip_pipeline(self.encoder, merges, unk_token, sorted(specials))
        except Exception as err:  # tokenizers raises bare Exceptions for a bad vocabulary
            raise ValueError(f"{name}: not a usable BPE vocabulary ({err})") from None
        self._specials = sorted(specials)
        self.added_tokens = tuple(added_tokens)
        self._tokenizer.add_tokens(list(self.added_tokens))
        self.added_encoder = {t.content: self._tokenizer.token_to_id(t.content)
                              for t in self.added_tokens}
        expected = {t.content: len(self.encoder) + i for i, t in enumerate(self.added_tokens)}
        if self.added_encoder != expected:
            wrong = [t for t in expected if self.added_encoder[t] != expected[t]]
            raise ValueError(f"{name}: added tokens {wrong} are already in the vocabulary or "
                             f"repeated; added tokens must be new and take the ids after it")
        self.expansions = _multi_vector_expansions(self.added_encoder)

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
        `merges.txt` (+ `special_tokens_map.json`). The pad token is the folder's unless given.

        Only the vocabulary, merges, special and added tokens are read from `tokenizer.json`; the
        pipeline is always CLIP's, so a file's padding or truncation settings cannot change the ids.
        Added (non-special) tokens come from `added_tokens_decoder` (tokenizer_config.json),
        tokenizer.json's `added_tokens` or transformers 4's `added_tokens.json`, with their ids."""
        folder = os.fspath(folder)
        settings = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            settings.update(_read_json(os.path.join(folder, fname), optional=True) or {})
        tokens = {role: _token_content(settings.get(f"{role}_token"))
                  for role in ("bos", "eos", "pad", "unk")}
        extra = [_token_content(t) for t in settings.get("additional_special_tokens", [])]
        decoder = settings.get("added_tokens_decoder") or {}
        extra += [_token_content(t) for t in decoder.values() if t.get("special", True)]
        added = {int(i): t for i, t in decoder.items() if not t.get("special", True)}
        legacy = _read_json(os.path.join(folder, "added_tokens.json"), optional=True) or {}
        added.update({int(i): {"content": t} for t, i in legacy.items()})
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
            added.update({t["id"]: t for t in spec.get("added_tokens", []) if not t.get("special")})
        else:
            raise FileNotFoundError(
                f"{folder}: no tokenizer files (need vocab.json + merges.txt, or tokenizer.json)")
        if pad_token is not None:
            tokens["pad"] = pad_token
        return cls(vocab, merges,
                   **{f"{role}_token": tok for role, tok in tokens.items() if tok is not None},
                   special_tokens=[t for t in extra if t],
                   added_tokens=_read_added_tokens(added, len(vocab), folder), name=name)

    def with_added_tokens(self, tokens: Mapping[str, int]) -> "CLIPTokenizer":
        """A copy that also knows `tokens` ({token: number of vectors}): `T` of n vectors adds
        `T`, `T_1`, ..., `T_{n-1}` (diffusers' names) after the current ids, and expands to them.
        A token the tokenizer already reads as one id is an error (see `token_in_use`)."""
        new = []
        for token, count in tokens.items():
            if count < 1:
                raise ValueError(f"token {token!r}: needs at least one vector, got {count}")
            new += vector_names(token, count)
        seen: dict[str, str] = {}
        for content in new:
            clash = self.token_in_use(content)
            if clash:
                raise ValueError(f"{self.name}: cannot add token {content!r}: it is {clash}")
            if clean_text(content) in seen:
                raise ValueError(f"{self.name}: tokens {seen[clean_text(content)]!r} and "
                                 f"{content!r} read the same")
            seen[clean_text(content)] = content
        extended = CLIPTokenizer(
            self.encoder, sorted(self.ranks, key=self.ranks.get), pad_token=self.pad_token,
            bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
            special_tokens=self._specials,
            added_tokens=self.added_tokens + tuple(_added_token(t) for t in new), name=self.name)
        # Expansion goes by name (T_1, T_2, ...): a token named like another's next vector would
        # join it ("x" of one vector and a token "x_1").
        counts = {extended.added_encoder[t]: n for t, n in tokens.items()}
        counts.update({i: len(ids) for i, ids in self.expansions.items()})
        for first, ids in extended.expansions.items():
            if len(ids) != counts.get(first, 1):
                names = [extended.decode([i], skip_special_tokens=False) for i in ids]
                raise ValueError(f"{self.name}: added tokens {names} would read as one token of "
                                 f"{len(ids)} vectors (diffusers' T, T_1, ... naming); rename one")
        return extended

    def token_in_use(self, token: str) -> Optional[str]:
        """What `token` already reads as, if it reads as one id: an added token (compared as CLIP
        normalises) or a word of the vocabulary; None if it is free to add."""
        normalized = clean_text(token)
        for added in self.added_tokens:
            if (clean_text(added.content) if added.normalized else added.content) == normalized:
                return f"the added token {added.content!r} (id {self.added_encoder[added.content]})"
        ids = self._tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) == 1 and ids[0] < len(self.encoder):
            return f"the vocabulary's {self.decoder[ids[0]]!r} (id {ids[0]}) of {self.name}"
        return None

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt and special_tokens_map.json: the folder layout of the SD
        checkpoints people have, which `from_pretrained` and transformers both read. Added tokens
        go to tokenizer_config.json's `added_tokens_decoder`, where transformers finds them."""
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
        added = {str(self.added_encoder[t.content]): _added_token_dict(t)
                 for t in self.added_tokens}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({**specials, "model_max_length": 77, "do_lower_case": True,
                       "tokenizer_class": "CLIPTokenizer",
                       **({"added_tokens_decoder": added} if added else {})}, f, indent=2)

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

    def __len__(self) -> int:
        return len(self.encoder) + len(self.added_tokens)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`: no BOS/EOS, no truncation (long prompts are chunked by callers);
        multi-vector tokens expanded."""
        return [i for group in self.encode_grouped(text) for i in group]

    def encode_grouped(self, text: str) -> list[tuple[int, ...]]:
        """`encode`'s ids, one group per token: one id, or every id of a multi-vector token (which
        a caller cutting the ids into windows should keep together)."""
        return self._expand(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _expand(self, ids: Sequence[int]) -> list[tuple[int, ...]]:
        return [self.expansions.get(i, (i,)) for i in ids]

    def __call__(self, texts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
        """(B, max_length) int32: BOS, the first max_length-2 text ids, EOS, then pad ids."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        # Truncation and padding stay here, not in the Rust tokenizer's settings, so that
        # `max_length` is per call and `encode` is never truncated.
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        out = np.full((len(encodings), max_length), self.pad_token_id, dtype=np.int32)
        out[:, 0] = self.bos_token_id
        for row, encoding in enumerate(encodings):
            ids = [i for group in self._expand(encoding.ids) for i in group][:max_length - 2]
            out[row, 1:len(ids) + 1] = ids
            out[row, len(ids) + 1] = self.eos_token_id
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, words separated by spaces (as the reference decodes CLIP's `</w>`)."""
        text = self._tokenizer.decode([int(i) for i in ids],
                                      skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()


def vector_names(token: str, count: int) -> list[str]:
    """The tokenizer entries of a token of `count` vectors (diffusers' names): T, T_1, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def _added_token(content: str) -> AddedToken:
    # normalized: matched in the lowercased text, so in any case; single_word: never inside a word.
    return AddedToken(content, single_word=True, normalized=True, special=False)


def _added_token_dict(token: AddedToken) -> dict:
    """transformers' `added_tokens_decoder` entry."""
    return {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
            "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}


def _multi_vector_expansions(added: Mapping[str, int]) -> dict[int, tuple[int, ...]]:
    """{id of T: ids of T, T_1, T_2, ...} for each added T followed by T_1 (diffusers' rule in
    `maybe_convert_prompt`)."""
    expansions = {}
    for content, first in added.items():
        ids = [first]
        while f"{content}_{len(ids)}" in added:
            ids.append(added[f"{content}_{len(ids)}"])
        if len(ids) > 1:
            expansions[first] = tuple(ids)
    return expansions


def _clip_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str,
                   specials: Sequence[str]) -> Tokenizer:
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                              end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=unk_token))
    tokenizer.normalizer = _NORMALIZER
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


@functools.lru_cache(maxsize=1)
def _shipped_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
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


def _read_added_tokens(entries: Mapping[int, Mapping], vocab_size: int,
                       folder: str) -> list[AddedToken]:
    """A folder's added tokens ({id: transformers' entry}) in id order; ids inside the vocabulary
    are its own tokens (e.g. BOS and EOS listed again) and skipped."""
    added = sorted((i, t) for i, t in entries.items() if i >= vocab_size)
    ids = [i for i, _ in added]
    if ids != list(range(vocab_size, vocab_size + len(ids))):
        raise ValueError(f"{folder}: added token ids {ids} do not follow the vocabulary "
                         f"({vocab_size} tokens) without gaps")
    flags = ("single_word", "lstrip", "rstrip", "normalized")
    return [AddedToken(t["content"], special=False, **{f: bool(t[f]) for f in flags if f in t})
            for _, t in added]


def _token_content(token) -> Optional[str]:
    if isinstance(token, dict):
        return token.get("content")
    return token
