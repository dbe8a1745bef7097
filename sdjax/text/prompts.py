"""Prompt syntax as the WebUI reads it: emphasis and long prompts.

- `(words)` multiplies the attention weight of its tokens by 1.1, `[words]` divides it by 1.1,
  `(words:1.3)` sets the multiplier to 1.3; brackets nest and multiply; `\\(` is a literal bracket.
- `BREAK` (upper case, as its own word) ends the current 75-token chunk.
- A prompt longer than 75 tokens is cut into 75-token chunks; each becomes one CLIP window
  ([BOS] + tokens + [EOS] + padding, 77 ids) and their embeddings are concatenated.

- `<lora:NAME:WEIGHT>` and the WebUI's other forms of that tag (`extract_loras`) name a LoRA to
  apply; the tag is removed from the text the tokenizer sees.

The token ids go to the text encoder; the per-token weights scale its output (`apply_emphasis`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

CHUNK_TOKENS = 75  # 77 minus BOS and EOS
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = None  # marker in a parsed prompt


def parse_emphasis(text: str) -> list[tuple[str | None, float]]:
    """Split a prompt into (text, weight) runs; `(None, 0)` marks a BREAK.

    >>> parse_emphasis("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            if run[0] is not BREAK:
                run[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(text, weight, match.start(1)))
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_BRACKET_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append([BREAK, 0.0])
                runs.append([part, 1.0])
    # Unclosed brackets still apply, to the end of the prompt.
    for start in round_open:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)
    merged: list[list] = []
    for run in runs:
        if (merged and run[0] is not BREAK and merged[-1][0] is not BREAK
                and merged[-1][1] == run[1]):
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def _weight(prompt: str, text: str, position: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"prompt {prompt!r}: emphasis weight {text!r} at character {position} is "
                         f"not a number (write e.g. (red:1.2))")
    return value


def tokenize_weighted(tokenizer, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """A prompt -> (ids (chunks, 77) int32, weights (chunks, 77) float32).

    A plain prompt of at most 75 tokens gives exactly the reference tokenizer's single row.
    """
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close_chunk() -> None:
        nonlocal ids, weights
        chunks.append((ids, weights))
        ids, weights = [], []

    for text, weight in parse_emphasis(prompt):
        if text is BREAK:
            close_chunk()
            continue
        # A multi-vector embedding's ids stay in one chunk: the WebUI starts a new chunk for an
        # embedding that does not fit in the current one.
        for group in tokenizer.encode_grouped(text):
            if ids and len(ids) + len(group) > CHUNK_TOKENS:
                close_chunk()
            ids.extend(group)
            weights.extend([weight] * len(group))
    if ids or not chunks:
        close_chunk()
    width = CHUNK_TOKENS + 2
    out_ids = np.full((len(chunks), width), tokenizer.pad_token_id, dtype=np.int32)
    out_weights = np.ones((len(chunks), width), dtype=np.float32)
    for row, (chunk_ids, chunk_weights) in enumerate(chunks):
        n = len(chunk_ids)
        out_ids[row, :n + 2] = [tokenizer.bos_token_id, *chunk_ids, tokenizer.eos_token_id]
        out_weights[row, 1:n + 1] = chunk_weights
    return out_ids, out_weights


def tokenize_batch(tokenizer, prompts: Sequence[str], min_chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Several prompts -> (ids (B, chunks, 77), weights (B, chunks, 77)), all padded to the same
    number of chunks (at least `min_chunks`) with empty-prompt chunks, so a prompt and its negative
    prompt line up."""
    rows = [tokenize_weighted(tokenizer, p) for p in prompts]
    n = max([min_chunks] + [ids.shape[0] for ids, _ in rows])
    empty_ids, empty_weights = tokenize_weighted(tokenizer, "")
    ids = np.stack([np.concatenate([i] + [empty_ids] * (n - len(i))) for i, _ in rows])
    weights = np.stack([np.concatenate([w] + [empty_weights] * (n - len(w))) for _, w in rows])
    return ids, weights


def apply_emphasis(hidden: "jax.Array", weights: "jax.Array") -> "jax.Array":
    """Scale token embeddings (B, L, D) by their weights (B, L), then restore each image's mean, as
    the WebUI does (per image here, so an image never depends on the rest of its batch).

    Rows with every weight 1 are returned unchanged. The mean is not restored where it is (near)
    zero — e.g. a final layer norm without bias — since the ratio would then be noise or 0/0.
    """
    import jax.numpy as jnp

    axes = tuple(range(1, hidden.ndim))
    original_mean = jnp.mean(hidden, axis=axes, keepdims=True)
    scaled = hidden * weights[..., None].astype(hidden.dtype)
    new_mean = jnp.mean(scaled, axis=axes, keepdims=True)
    scale_of_values = jnp.mean(jnp.abs(hidden), axis=axes, keepdims=True)
    meaningful = jnp.abs(new_mean) > 1e-3 * scale_of_values
    ratio = jnp.where(meaningful, original_mean / jnp.where(meaningful, new_mean, 1.0), 1.0)
    emphasised = jnp.any(weights != 1.0, axis=tuple(range(1, weights.ndim)))
    emphasised = emphasised.reshape(emphasised.shape + (1,) * (hidden.ndim - 1))
    return jnp.where(emphasised, scaled * ratio, hidden)


# --- extra networks: <lora:...> -------------------------------------------------------------------

# The WebUI's `extra_networks.re_extra_net`: <kind:arg1:arg2:...>.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# Extra-network kinds sdjax applies; the WebUI's Lora extension also answers to `lyco`.
LORA_KINDS = ("lora", "lyco")


@dataclasses.dataclass(frozen=True)
class NamedLora:
    """A LoRA named by a `<lora:...>` tag, a `--lora` flag or a request entry: a file name (stem)
    in a LoRA folder, or a path, with its weight for the U-Net and for the text encoder(s)."""
    name: str
    unet: float = 1.0
    text_encoder: float = 1.0


def extract_loras(prompt: str) -> tuple[str, tuple[NamedLora, ...]]:
    """(the prompt without its extra-network tags, the LoRAs they name), as the WebUI's built-in
    Lora extension reads `<lora:NAME[:TE[:UNET]]>` with `te=` / `unet=` named arguments: one number
    weighs both models, a second is the U-Net's. A tag of another kind (`<hypernet:...>`), a bad
    number or an argument sdjax does not apply (`dyn=`) is a ValueError naming the tag."""
    found: list[NamedLora] = []

    def take(match: re.Match) -> str:
        found.append(_lora_of_tag(prompt, match.group(0), match.group(1), match.group(2)))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tuple(found)


def _lora_of_tag(prompt: str, tag: str, kind: str, args: str) -> NamedLora:
    where = f"prompt {prompt!r}: {tag}"
    if kind not in LORA_KINDS:
        raise ValueError(f"{where} is a {kind!r} extra network; sdjax applies only "
                         f"{' and '.join(f'<{k}:...>' for k in LORA_KINDS)} tags")
    positional, named = [], {}
    for item in args.split(":"):
        # As the WebUI's ExtraNetworkParams: "key=value" is named, anything else positional.
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:
        extra = unknown[0] + "=" if unknown else f"a fourth argument ({positional[3]!r})"
        raise ValueError(f"{where}: {extra} is not applied by sdjax (it reads <lora:NAME:TE:UNET> "
                         f"and te=, unet=)")
    if not positional or not positional[0]:
        raise ValueError(f"{where} names no LoRA (write <lora:NAME:WEIGHT>)")

    def number(text: str, what: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{where}: {what} {text!r} is not a number")
        return value

    te = number(positional[1], "weight") if len(positional) > 1 else 1.0
    te = number(named["te"], "te") if "te" in named else te
    unet = number(positional[2], "U-Net weight") if len(positional) > 2 else te
    unet = number(named["unet"], "unet") if "unet" in named else unet
    return NamedLora(positional[0], unet=unet, text_encoder=te)
