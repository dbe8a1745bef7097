"""The offline CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sdjax.text.tokenizer import EOS_TOKEN, CLIPTokenizer, _shipped_vocab, clean_text

PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "a photograph of an astronaut riding a horse, highly detailed, 8k, trending on artstation",
    "don't stop; it's what we'll do, they've said, I'm sure you'd agree, we're here",
    "DON'T SHOUT'S",
    "numbers: 1234567890 3.14159 1,000,000 2nd 21st",
    "punctuation!!! ??? ... --- (brackets) [square] {curly} <angle> @#$%^&*_+=~`|\\/",
    "masterpiece, (best quality:1.2), [[ugly]], {{{cute}}}",
    "café naïve résumé façade jalapeño Über Ångström",
    "e\u0301 composed by NFC: cafe\u0301",
    "emoji 🐱🚀 party 🎉 👩‍👩‍👧 ❤️",
    "东京的夜景 日本語のテキスト 한국어 문장",
    "ΑΣ ΑΣΑ ΟΔΥΣΣΕΥΣ greek capitals",
    "İstanbul straße ﬁne ﬂower",
    "multiple    spaces\tand\ttabs\n\nand\r\nnewlines   ",
    "   leading and trailing   ",
    "nbsp\u00a0and ideographic\u3000space",
    "control\x1cchars\x07here",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "hyphen-ated words and under_scores and CamelCaseWords",
    "a" + " cat" * 120,
    "long prompt " + ", ".join(f"detail number {i}" for i in range(60)),
    "<|endoftext|> inside the text",
    "hello<|startoftext|>world",
    "<|ENDOFTEXT|> in caps is not special",
    "wow!! hi! a!b!!!",
    "quotes \"double\" and 'single' and `back`",
    "em—dash – en dash … ellipsis “curly quotes” ‘single’",
    "math: x² + y³ = z⁴, ½ ¼ ∑ ∞ √2",
    "url https://example.com/path?q=1&b=2 and e-mail me@example.org",
    "arabic: مرحبا بالعالم, hebrew: שלום",
    "hindi: नमस्ते दुनिया, thai: สวัสดีชาวโลก",
    "cyrillic: Привет мир",
    "tab\tseparated\tvalues\t1\t2",
    "'s 's's ''s '' ' '",
    "mixed123letters456 and 7up and r2d2",
    "zero-width\u200bjoiner\u200dhere",
    "fullwidth ＡＢＣ １２３",
    "!!!???... ---- ?! ...",
    "1234567 3.14 -0.5 1e10 2024-11-24",
    "(red:1.2) and [blue], ((masterpiece)), [[low quality:0.8]], (a:b:1.1), \\(escaped\\)",
    "<b>bold</b> &amp; <br/> <div class=\"x\">text</div> <!-- comment -->",
    "it's don't IT'S Don't rock'n'roll o'clock 'quoted'",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "\u00a0\u00a0leading nbsp, trailing tab\t",
    " \t\n ",
    "!",
    "<|startoftext|><|endoftext|>!<|endoftext|>!!",
]


@pytest.fixture(scope="module")
def vocab_and_merges():
    return _shipped_vocab()


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["pad_eos", "pad_bang"])
def pair(request, vocab_and_merges):
    import transformers
    vocab, merges = vocab_and_merges
    reference = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77,
                                           pad_token=request.param)
    return CLIPTokenizer.default(pad_token=request.param), reference


def test_known_ids():
    ids = CLIPTokenizer.default()("a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert CLIPTokenizer.default().encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_shipped_vocabulary_shape(vocab_and_merges):
    vocab, merges = vocab_and_merges
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_batch_matches_transformers(pair):
    ours, reference = pair
    got = ours(PROMPTS)
    want = np.asarray(reference(PROMPTS, padding="max_length", max_length=77,
                                truncation=True).input_ids)
    assert got.shape == (len(PROMPTS), 77)
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g.tolist() == w.tolist(), f"prompt {prompt!r}"


def test_encode_matches_transformers_without_truncation(pair):
    ours, reference = pair
    for prompt in PROMPTS:
        want = reference(prompt, add_special_tokens=False).input_ids
        assert ours.encode(prompt) == want, f"prompt {prompt!r}"
    assert len(ours.encode(PROMPTS[22])) > 100


def test_truncation_keeps_eos_last_and_short_max_length():
    tok = CLIPTokenizer.default(pad_token="!")
    ids = tok(["a" + " cat" * 120, "cat"], max_length=10)
    assert ids.shape == (2, 10)
    assert ids[0].tolist() == [49406, 320] + [2368] * 7 + [49407]
    assert ids[1].tolist() == [49406, 2368, 49407] + [0] * 7


def test_decode_matches_transformers(pair):
    ours, reference = pair
    for row in ours(PROMPTS):
        for skip in (True, False):
            assert ours.decode(row, skip_special_tokens=skip) == reference.decode(
                row.tolist(), skip_special_tokens=skip)


def test_pipeline_is_the_one_transformers_builds(pair):
    """Normaliser, pre-tokenizer, decoder, BPE settings and special tokens as transformers' CLIP
    tokenizer sets them: a change on either side shows here before it shows as a stray id."""
    ours, reference = pair
    mine = json.loads(ours._tokenizer.to_str())
    theirs = json.loads(reference.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "added_tokens"):
        assert mine[key] == theirs[key], key
    settings = lambda model: {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    assert settings(mine["model"]) == settings(theirs["model"])


def test_tokenizing_imports_neither_torch_nor_transformers():
    code = ("import sys\n"
            "from sdjax.text.tokenizer import CLIPTokenizer\n"
            "tokenizer = CLIPTokenizer.default(pad_token='!')\n"
            "assert tokenizer(['a photo of a cat'])[0, :7].tolist() == "
            "[49406, 320, 1125, 539, 320, 2368, 49407]\n"
            "assert tokenizer.decode(tokenizer.encode('a cat')) == 'a cat'\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_vocabulary_without_its_merges_tokens_names_its_source(vocab_and_merges):
    vocab, merges = vocab_and_merges
    small = {t: i for t, i in vocab.items() if i < 600 or i >= 49406}
    with pytest.raises(ValueError, match="my-folder/vocab.json: not a usable BPE vocabulary"):
        CLIPTokenizer(small, merges, name="my-folder/vocab.json")


def test_clean_text_lowercases_sigma_per_character():
    assert clean_text("ΟΔΥΣ  Σ\n") == "οδυσ σ "


def _save_vocab_folder(path, vocab, merges, pad_token):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": pad_token}, f)


@pytest.mark.parametrize("pad_token", [EOS_TOKEN, "!"])
def test_folder_formats_give_the_same_ids(tmp_path, vocab_and_merges, pad_token):
    import transformers
    vocab, merges = vocab_and_merges
    legacy = tmp_path / "legacy"
    _save_vocab_folder(legacy, vocab, merges, pad_token)
    # transformers 5's save_pretrained writes only tokenizer.json + tokenizer_config.json.
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(legacy)).save_pretrained(str(saved))
    assert sorted(os.listdir(saved)) == ["tokenizer.json", "tokenizer_config.json"]

    from_legacy = CLIPTokenizer.from_pretrained(legacy)
    from_saved = CLIPTokenizer.from_pretrained(saved)
    pad_id = vocab[pad_token]
    assert from_legacy.pad_token_id == from_saved.pad_token_id == pad_id
    default = CLIPTokenizer.default(pad_token=pad_token)
    reference = transformers.CLIPTokenizer.from_pretrained(str(legacy))
    want = np.asarray(reference(PROMPTS, padding="max_length", max_length=77,
                                truncation=True).input_ids)
    np.testing.assert_array_equal(from_legacy(PROMPTS), want)
    np.testing.assert_array_equal(from_saved(PROMPTS), want)
    np.testing.assert_array_equal(default(PROMPTS), want)


def test_tokenizer_json_with_string_merges_and_padding_settings(tmp_path, vocab_and_merges):
    """transformers 4 wrote merges as "a b" strings; a file's own padding/truncation settings do
    not change sdjax's ids (the pipeline is always CLIP's)."""
    import transformers
    vocab, merges = vocab_and_merges
    legacy = tmp_path / "legacy"
    _save_vocab_folder(legacy, vocab, merges, "!")
    reference = transformers.CLIPTokenizer.from_pretrained(str(legacy))
    reference.save_pretrained(str(tmp_path / "saved"))
    spec = json.loads((tmp_path / "saved" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    spec["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst",
                          "stride": 0}
    (tmp_path / "saved" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert tok.pad_token_id == 0
    want = np.asarray(reference(PROMPTS, padding="max_length", max_length=77,
                                truncation=True).input_ids)
    np.testing.assert_array_equal(tok(PROMPTS), want)


def test_pad_token_override(tmp_path, vocab_and_merges):
    vocab, merges = vocab_and_merges
    _save_vocab_folder(tmp_path, vocab, merges, EOS_TOKEN)
    tok = CLIPTokenizer.from_pretrained(tmp_path, pad_token="!")
    assert tok.pad_token_id == 0
    assert tok("cat")[0, 3:].tolist() == [0] * 74


def test_missing_tokenizer_files_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_decode_round_trip():
    tok = CLIPTokenizer.default()
    assert tok.decode(tok("a photo of a cat, 2 dogs!")[0]) == "a photo of a cat , 2 dogs !"


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_save_pretrained_round_trips_and_reference_reads_it(tmp_path, pad):
    from transformers import CLIPTokenizer as ReferenceTokenizer

    ours = CLIPTokenizer.default(pad_token=pad)
    ours.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    reference = ReferenceTokenizer.from_pretrained(str(tmp_path))
    prompts = ["a photo of a cat", "Hello, World! 123 don't", ""]
    np.testing.assert_array_equal(again(prompts), ours(prompts))
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours(prompts), np.asarray(expected))
