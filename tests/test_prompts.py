"""Prompt emphasis and chunking, as the WebUI parses them."""
import numpy as np
import pytest

from sdjax.text.prompts import BREAK, apply_emphasis, parse_emphasis, tokenize_batch, tokenize_weighted
from sdjax.text.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default()


@pytest.mark.parametrize("prompt,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[words]", [("words", 1 / 1.1)]),
    ("one BREAK two", [("one", 1.0), (BREAK, 0.0), ("two", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_emphasis_matches_the_webui(prompt, expected):
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_plain_prompt_equals_plain_tokenization(tokenizer):
    ids, weights = tokenize_weighted(tokenizer, "a photo of a cat")
    np.testing.assert_array_equal(ids, tokenizer(["a photo of a cat"]))
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert np.all(weights == 1.0)


def test_openclip_padding_is_kept(tokenizer):
    sd2 = CLIPTokenizer.default(pad_token="!")
    ids, _ = tokenize_weighted(sd2, "a cat")
    np.testing.assert_array_equal(ids, sd2(["a cat"]))
    assert ids[0, -1] == 0


def test_long_prompt_is_chunked_in_75s(tokenizer):
    prompt = ", ".join(["cat"] * 100)  # 199 tokens
    n_tokens = len(tokenizer.encode(prompt))
    ids, weights = tokenize_weighted(tokenizer, prompt)
    assert ids.shape == (-(-n_tokens // 75), 77)
    assert np.all(ids[:, 0] == tokenizer.bos_token_id)
    flat = [t for row in ids for t in row[1:76]][:n_tokens]
    assert flat == tokenizer.encode(prompt)
    assert ids[0, 76] == tokenizer.eos_token_id


def test_break_starts_a_new_chunk_and_weights_follow_tokens(tokenizer):
    ids, weights = tokenize_weighted(tokenizer, "a (red:1.5) cat BREAK blue sky")
    assert ids.shape == (2, 77)
    red = tokenizer.encode("red")[0]
    position = list(ids[0]).index(red)
    assert weights[0, position] == np.float32(1.5)
    assert ids[1, 1:3].tolist() == tokenizer.encode("blue sky")
    assert weights[1].tolist() == [1.0] * 77


def test_batch_pads_to_same_chunk_count(tokenizer):
    ids, weights = tokenize_batch(tokenizer, ["short", "long " * 90])
    assert ids.shape == (2, 2, 77)
    np.testing.assert_array_equal(ids[0, 1], tokenize_weighted(tokenizer, "")[0][0])


def test_apply_emphasis_keeps_mean_and_is_identity_without_weights():
    rng = np.random.RandomState(0)
    hidden = rng.randn(2, 77, 16).astype(np.float32) + 0.3
    ones = np.ones((2, 77), np.float32)
    np.testing.assert_allclose(np.asarray(apply_emphasis(hidden, ones)), hidden, rtol=1e-6)
    weights = ones.copy()
    weights[0, 3] = 1.5
    out = np.asarray(apply_emphasis(hidden, weights))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), hidden.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(out[1], hidden[1])  # the other image is untouched
    ratio = out[0, 3] / out[0, 4]
    np.testing.assert_allclose(ratio, 1.5 * hidden[0, 3] / hidden[0, 4], rtol=1e-4)


def test_apply_emphasis_is_finite_when_the_mean_is_zero():
    rng = np.random.RandomState(1)
    hidden = rng.randn(2, 77, 16).astype(np.float32)
    hidden -= hidden.mean(axis=-1, keepdims=True)  # like a layer norm without bias: mean exactly ~0
    weights = np.ones((2, 77), np.float32)
    weights[0, 5] = 1.3
    out = np.asarray(apply_emphasis(hidden, weights))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 5], 1.3 * hidden[0, 5], rtol=1e-6)
    np.testing.assert_array_equal(out[1], hidden[1])
