"""T5's SentencePiece (Unigram) tokenizer, offline, giving the same ids as transformers 5's
`T5Tokenizer` / `T5TokenizerFast` (what SD3's and Flux's pipelines use).

transformers 5 builds one pipeline whatever the folder holds, and so does this module: the
vocabulary (pieces and scores) and the SentencePiece normalisation table (`precompiled_charsmap`)
are read from `tokenizer.json` or, when only `spiece.model` is there, from the SentencePiece model
(with `<extra_id_N>` sentinels appended, as transformers does); then the precompiled normaliser,
whitespace split, "▁" prefixed to every word, Unigram. A `tokenizer.json`'s own normaliser or
pre-tokeniser settings are not used (transformers drops them too). Special tokens written
literally in a prompt (`</s>`, `<extra_id_0>`) become their ids, as in the reference.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import Unigram

from sdjax.text import prompts
from sdjax.text.tokenizer import _added_token_dict, _read_json, _token_content

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
DEFAULT_EXTRA_IDS = 100  # transformers' T5Tokenizer default: <extra_id_0> .. <extra_id_99>
_METASPACE = dict(replacement="▁", prepend_scheme="always", split=True)
_SENTINEL = re.compile(r"<extra_id_\d+>")


class T5Tokenizer:
    """`__call__` gives (B, max_length) ids: the text's ids cut to max_length - 1, EOS, then pad
    ids (transformers with `truncation=True, padding="max_length"`). Build with
    `from_pretrained(folder)`."""

    def __init__(self, vocab: Sequence[tuple[str, float]], *,
                 precompiled_charsmap: Optional[bytes] = None, pad_token: str = PAD_TOKEN,
                 eos_token: str = EOS_TOKEN, unk_token: str = UNK_TOKEN,
                 added_tokens: Sequence[AddedToken] = (), name: str = "<vocab>"):
        self.vocab = [(str(piece), float(score)) for piece, score in vocab]
        self.precompiled_charsmap = precompiled_charsmap or None
        self.name = name
        ids = {piece: i for i, (piece, _) in enumerate(self.vocab)}
        for role, token in (("pad", pad_token), ("eos", eos_token), ("unk", unk_token)):
            if token not in ids:
                raise ValueError(f"{name}: {role} token {token!r} is not in the vocabulary")
        self.pad_token, self.eos_token, self.unk_token = pad_token, eos_token, unk_token
        try:
            tokenizer = Tokenizer(Unigram(self.vocab, unk_id=ids[unk_token], byte_fallback=False))
            if self.precompiled_charsmap:
                tokenizer.normalizer = normalizers.Precompiled(self.precompiled_charsmap)
        except Exception as err:  # tokenizers raises bare Exceptions for a bad vocabulary or table
            raise ValueError(f"{name}: not a usable Unigram vocabulary ({err})") from None
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**_METASPACE)])
        tokenizer.decoder = decoders.Metaspace(**_METASPACE)
        specials = [AddedToken(t, special=True, normalized=False)
                    for t in (pad_token, eos_token, unk_token)]
        self.added_tokens = tuple(specials) + tuple(
            t for t in added_tokens if t.content not in (pad_token, eos_token, unk_token))
        for token in self.added_tokens:
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
        self._tokenizer = tokenizer

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "T5Tokenizer":
        """A T5 tokenizer folder: `tokenizer.json` (with `tokenizer_config.json`), or
        `spiece.model` alone (transformers 4's slow-tokenizer folders)."""
        folder = os.fspath(folder)
        settings = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            settings.update(_read_json(os.path.join(folder, fname), optional=True) or {})
        roles = {role: _token_content(settings.get(f"{role}_token")) or default
                 for role, default in (("pad", PAD_TOKEN), ("eos", EOS_TOKEN), ("unk", UNK_TOKEN))}
        tokenizer_json = os.path.join(folder, "tokenizer.json")
        spiece = os.path.join(folder, "spiece.model")
        decoder = settings.get("added_tokens_decoder") or {}
        given_ids = {int(i): e["content"] for i, e in decoder.items()}
        if os.path.isfile(tokenizer_json):
            name = tokenizer_json
            vocab, charsmap, entries = _read_tokenizer_json(tokenizer_json)
            added = [_added_token(e) for e in entries]
            given_ids.update({int(e["id"]): e["content"] for e in entries})
        elif os.path.isfile(spiece):
            name = spiece
            vocab, charsmap = _read_spiece(spiece)
            extra_ids = int(settings.get("extra_ids", DEFAULT_EXTRA_IDS))
            vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
            added = [AddedToken(piece, special=True, normalized=False)
                     for piece, _ in vocab[-extra_ids:]] if extra_ids else []
        else:
            raise FileNotFoundError(f"{folder}: no T5 tokenizer files (need tokenizer.json or "
                                    f"spiece.model)")
        named = [_token_content(t) for key in ("additional_special_tokens", "extra_special_tokens")
                 for t in settings.get(key) or ()]
        added += [AddedToken(t, special=True, normalized=False) for t in named if t]
        added += [_added_token(entry) for _, entry in sorted(decoder.items(), key=lambda x: int(x[0]))]
        tokenizer = cls(vocab, precompiled_charsmap=charsmap, pad_token=roles["pad"],
                        eos_token=roles["eos"], unk_token=roles["unk"],
                        added_tokens=_unique(added), name=name)
        wrong = [f"{t!r} (the folder: {i}, here: {tokenizer._tokenizer.token_to_id(t)})"
                 for i, t in sorted(given_ids.items()) if tokenizer._tokenizer.token_to_id(t) != i]
        if wrong:
            raise ValueError(f"{folder}: added tokens would not get the ids the folder gives them: "
                             + ", ".join(wrong[:5]))
        return tokenizer

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json, which `from_pretrained` and
        transformers' T5Tokenizer both read."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(self._tokenizer.to_str())
        sentinels = [t.content for t in self.added_tokens if _SENTINEL.fullmatch(t.content)]
        added = {str(self._tokenizer.token_to_id(t.content)): _added_token_dict(t)
                 for t in self.added_tokens}
        config = {"tokenizer_class": "T5Tokenizer", "pad_token": self.pad_token,
                  "eos_token": self.eos_token, "unk_token": self.unk_token,
                  "extra_ids": len(sentinels), "additional_special_tokens": sentinels,
                  "added_tokens_decoder": added}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    # -- ids ---------------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.token_to_id(self.pad_token)

    @property
    def eos_token_id(self) -> int:
        return self._tokenizer.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`: no EOS, no truncation."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], max_length: int) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 1:
            raise ValueError(f"max_length must leave room for EOS, got {max_length}")
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        out = np.full((len(encodings), max_length), self.pad_token_id, dtype=np.int32)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids[:max_length - 1] + [self.eos_token_id]
            out[row, :len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([int(i) for i in ids],
                                      skip_special_tokens=skip_special_tokens)


def tokenize_weighted_t5(tokenizer: T5Tokenizer, prompt: str,
                         max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """A prompt with the WebUI's emphasis syntax -> (ids (max_length,) int32, weights
    (max_length,) float32), laid out as `tokenizer(prompt, max_length)[0]`; EOS and padding weigh 1.

    Each run of `prompts.parse_emphasis` is tokenized on its own, so a run that starts or ends
    inside a word ("(red)dish") gets other pieces than the whole word would, and every run starts
    a new word ("▁"). `BREAK` has no meaning for T5's single window and is dropped. A prompt
    without emphasis gives exactly the tokenizer's ids."""
    if max_length < 1:
        raise ValueError(f"max_length must leave room for EOS, got {max_length}")
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in prompts.parse_emphasis(prompt):
        if text is prompts.BREAK:
            continue
        run = tokenizer.encode(text)
        ids += run
        weights += [weight] * len(run)
    n = min(len(ids), max_length - 1)
    out_ids = np.full((max_length,), tokenizer.pad_token_id, dtype=np.int32)
    out_weights = np.ones((max_length,), dtype=np.float32)
    out_ids[:n + 1] = ids[:n] + [tokenizer.eos_token_id]
    out_weights[:n] = weights[:n]
    return out_ids, out_weights


def _read_tokenizer_json(path: str) -> tuple[list[tuple[str, float]], Optional[bytes], list[dict]]:
    """(pieces and scores, precompiled charsmap or None, added token entries in id order) of a
    Unigram tokenizer.json."""
    import base64

    spec = _read_json(path)
    model = spec.get("model") or {}
    if model.get("type", "Unigram") != "Unigram" or not isinstance(model.get("vocab"), list):
        raise ValueError(f"{path}: not a Unigram (SentencePiece) tokenizer: model type "
                         f"{model.get('type')!r}")
    try:
        vocab = [(piece, float(score)) for piece, score in model["vocab"]]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable Unigram vocabulary ({err})") from None
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    charsmap = next((base64.b64decode(s["precompiled_charsmap"]) for s in steps
                     if s.get("type") == "Precompiled" and s.get("precompiled_charsmap")), None)
    return vocab, charsmap, sorted(spec.get("added_tokens") or (), key=lambda t: t["id"])


def _read_spiece(path: str) -> tuple[list[tuple[str, float]], Optional[bytes]]:
    """(pieces and scores, precompiled charsmap or None) of a SentencePiece model file."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except (OSError, DecodeError) as err:
        raise ValueError(f"{path}: not a SentencePiece model ({err})") from None
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(f"{path}: a SentencePiece model of type "
                         f"{proto.trainer_spec.model_type}, not Unigram (T5's)")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    return vocab, proto.normalizer_spec.precompiled_charsmap or None


def _added_token(entry: dict) -> AddedToken:
    flags = ("single_word", "lstrip", "rstrip", "normalized")
    return AddedToken(entry["content"], special=bool(entry.get("special", True)),
                      **{f: bool(entry[f]) for f in flags if f in entry})


def _unique(tokens: Sequence[AddedToken]) -> list[AddedToken]:
    seen, out = set(), []
    for token in tokens:
        if token.content not in seen:
            seen.add(token.content)
            out.append(token)
    return out

