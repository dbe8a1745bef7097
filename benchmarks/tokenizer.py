"""Tokenizing many prompts: sdjax's CLIPTokenizer vs transformers' (both on `tokenizers`' Rust BPE),
timed in turn in one run.

    python -m benchmarks.tokenizer                                  # 10,000 prompts
    python -m benchmarks.tokenizer --prompts=40 --repeats=1         # seconds; what CI runs
    git show REV:sdjax/text/tokenizer.py > /tmp/old_tokenizer.py
    python -m benchmarks.tokenizer --baseline=/tmp/old_tokenizer.py # also an earlier sdjax's

The prompts are generated (seeded): everyday SD prompts mixed with the hard cases the parity tests
hold (accents, CJK, Cyrillic, emoji, punctuation runs, numbers, odd whitespace, HTML, WebUI
emphasis) and made-up words, some past 77 tokens. 'batch' is one call on the whole list giving
(N, 77) ids (BOS, text truncated to 75, EOS, pad), as training and CLIP scoring call it; 'one by
one' is `encode` per prompt, as prompt parsing calls it. Both reuse one list, so after the first
(untimed) round every word is in the tokenizers' caches; 'batch, unseen words' gives each round
the same prompts with three words that no round had before, as a server sees new prompts. Every
implementation is built from the shipped vocabulary. Rounds are interleaved and each figure is a
median. 'CPU s' counts every thread (`encode_batch` spreads a batch over the cores).
"""
from __future__ import annotations

import importlib.util
import random
import time

from absl import app, flags

from benchmarks import timing

flags.DEFINE_integer("prompts", 10_000, "how many prompts")
flags.DEFINE_integer("repeats", 5, "timed rounds of each implementation (median reported)")
flags.DEFINE_integer("seed", 0, "seed of the generated prompts")
flags.DEFINE_string("baseline", "", "another sdjax tokenizer.py (e.g. an earlier revision's, from "
                    "`git show`) to time in the same rounds; '' for none")
FLAGS = flags.FLAGS

MAX_LENGTH = 77

_SUBJECTS = [
    "a photo of a cat", "an astronaut riding a horse on Mars", "portrait of an old fisherman",
    "a castle on a hill at dawn", "Mount Fuji 富士山 in winter", "a bowl of phở bò and bánh mì",
    "Москва ночью, Красная площадь", "a café in Paris, façade with a naïve mural",
    "a robot 🤖 holding a 🌹", "東京の夜景, neon signs", "Ångström-scale crystal lattice",
    "a Cyberpunk street market", "(red:1.2) dragon over [blue] water", "a dog wearing a hat",
    "landscape with mountains and a lake", "close-up of a hummingbird's wing",
]
_MODIFIERS = [
    "highly detailed", "8k", "trending on artstation", "(masterpiece:1.2)", "((best quality))",
    "[blurry]", "{{cute}}", "(red:1.2)", "[blue]", "by Greg Rutkowski and Alphonse Mucha",
    "f/1.8, 85mm", "3.14", "1234567", "!!!???...", "----", "don't", "it's", "we'll see",
    "<b>bold</b> &amp; <br/>", "<|endoftext|>", "\tTabbed\tvalues", "  double  spaces ",
    "non\u00a0breaking space", "line\nbreak", "MiXeD CaSe", "ΟΔΥΣΣΕΥΣ", "emoji 🎉👩‍👩‍👧❤️",
    "ｆｕｌｌｗｉｄｔｈ", "x² + y³", "résumé", "Привет мир", "한국어 문장", "volumetric lighting",
    "octane render", "unreal engine 5", "bokeh", "golden hour", "35mm film grain",
]
_SYLLABLES = ["ka", "ri", "zo", "mel", "thra", "quin", "vor", "esh", "lu", "dax", "pyr", "nob"]


def make_prompts(n: int, seed: int) -> list[str]:
    """`n` varied prompts, the same for a given seed."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        parts = [rng.choice(_SUBJECTS)] + rng.sample(_MODIFIERS, rng.randint(1, 8))
        parts += ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4)))
                  for _ in range(rng.randint(0, 3))]
        rng.shuffle(parts)
        prompt = ", ".join(parts)
        if rng.random() < 0.1:  # past one 77-token window
            prompt = " ".join([prompt] * 4)
        prompts.append(prompt)
    return prompts


def with_unseen_words(prompts: list[str], seed: int) -> list[str]:
    """`prompts`, each followed by three random letter strings (practically never repeated)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [prompt + ", " + " ".join("".join(rng.choices(letters, k=rng.randint(5, 10)))
                                     for _ in range(3)) for prompt in prompts]


def _in_turn(calls):
    """One callable that runs the next of `calls` each time."""
    remaining = iter(calls)
    return lambda: next(remaining)()


def _load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("baseline_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CLIPTokenizer


def main(_):
    import numpy as np
    import tokenizers
    import transformers

    from sdjax.text.tokenizer import CLIPTokenizer, _shipped_vocab

    transformers.logging.set_verbosity_error()  # its per-call note on prompts past 77 tokens
    prompts = make_prompts(FLAGS.prompts, FLAGS.seed)
    vocab, merges = _shipped_vocab()
    builders = {"sdjax": lambda: CLIPTokenizer(vocab, merges),
                "transformers CLIPTokenizer": lambda: transformers.CLIPTokenizer(
                    vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)}
    if FLAGS.baseline:
        baseline_class = _load_baseline(FLAGS.baseline)
        builders[f"baseline {FLAGS.baseline}"] = lambda: baseline_class(vocab, merges)

    build_s, tokenizers_by_name = {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        tokenizers_by_name[name] = build()
        build_s[name] = time.perf_counter() - start

    def batch(name, texts):
        tokenizer = tokenizers_by_name[name]
        if name.startswith("transformers"):
            return lambda: tokenizer(texts, padding="max_length", max_length=MAX_LENGTH,
                                     truncation=True, return_tensors="np")["input_ids"]
        return lambda: tokenizer(texts, max_length=MAX_LENGTH)

    def one_by_one(name, texts):
        tokenizer = tokenizers_by_name[name]
        if name.startswith("transformers"):
            return lambda: [tokenizer.encode(p, add_special_tokens=False) for p in texts]
        return lambda: [tokenizer.encode(p) for p in texts]

    rounds = FLAGS.repeats + 1
    workloads = {"batch": (batch, [prompts] * rounds),
                 "batch, unseen words": (batch, [with_unseen_words(prompts, FLAGS.seed + 1 + r)
                                                 for r in range(rounds)]),
                 "one by one": (one_by_one, [prompts] * rounds)}
    runs = {(name, work): _in_turn([make(name, texts) for texts in lists])
            for work, (make, lists) in workloads.items() for name in builders}
    outputs = {key: run() for key, run in runs.items()}  # the untimed first round
    cpu_s: dict[tuple[str, str], list[float]] = {key: [] for key in runs}

    def timed_cpu(key):
        def run():
            start = time.process_time()
            runs[key]()
            cpu_s[key].append(time.process_time() - start)
        return run

    wall_s = timing.interleaved({key: timed_cpu(key) for key in runs}, FLAGS.repeats)

    reference = "transformers CLIPTokenizer"
    rows = []
    for (name, work), times in wall_s.items():
        seconds = timing.median(times)
        want, got = outputs[(reference, work)], outputs[(name, work)]
        same = (got == want if work == "one by one"
                else np.array_equal(np.asarray(got), np.asarray(want)))
        rows.append([name, work, seconds, timing.median(cpu_s[(name, work)]),
                     len(prompts) / seconds, seconds / timing.median(wall_s[("sdjax", work)]),
                     build_s[name] if work == "batch" else None, "yes" if same else "NO"])
    lengths = [len(ids) for ids in outputs[(reference, "one by one")]]
    print(f"{len(prompts)} prompts ({sum(lengths) / len(lengths):.1f} tokens on average, "
          f"{sum(n > MAX_LENGTH - 2 for n in lengths)} past {MAX_LENGTH - 2}), "
          f"{FLAGS.repeats} rounds, {timing.num_cores()} cores; tokenizers {tokenizers.__version__}, "
          f"transformers {transformers.__version__}")
    # transformers 5 has one CLIP tokenizer class, on `tokenizers`; the Fast name is an alias.
    print("transformers.CLIPTokenizerFast is CLIPTokenizer:",
          getattr(transformers, "CLIPTokenizerFast", None) is transformers.CLIPTokenizer)
    print(timing.table(["tokenizer", "work", "median s", "CPU s", "prompts/s", "s / sdjax's",
                        "build s", "same ids as transformers"], rows))


if __name__ == "__main__":
    app.run(main)
