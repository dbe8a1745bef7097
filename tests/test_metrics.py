"""CLIP score against transformers' CLIPProcessor + CLIPModel on a tiny random CLIP saved with
save_pretrained, the native CLIP folder, and the diversity metric.

Run with `-s` to see the measured max abs differences.
"""
import numpy as np
import pytest

from sdjax.evaluation import metrics
from sdjax.weights import clip as clip_weights
from sdjax.text.tokenizer import _shipped_vocab

import torch
import transformers

TOL = 1e-4  # on scores (100 x cosine)
PROMPTS = ["a red circle on the left, blue background", "a photo of a cat",
           "a large green square at the top and a small yellow cross at the bottom, "
           "black background",
           "(emphasis:1.3) is plain text to CLIP", "",
           "a " * 90 + "prompt past the 77-token context"]
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=24, patch_size=8, hidden_act="quick_gelu")
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_max_diffs():
    yield
    print("\nCLIP score max abs diffs vs transformers (score units, 100 x cosine):")
    for label, diff in sorted(MAX_DIFFS.items()):
        print(f"  {label:40s} {diff:.2e}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random CLIPModel and its CLIPProcessor, saved as a transformers folder."""
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # beyond the init's unit norms and zero biases, so nothing hides
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_scale = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if is_scale else 0.2 * noise)
    model.eval()
    vocab, merges = _shipped_vocab()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": VISION["image_size"]},
        crop_size={"height": VISION["image_size"], "width": VISION["image_size"]})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model, processor, folder


def _images(seed: int, n: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth content plus noise: bicubic resizing then has real work to do.
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
    base = 127.5 + 100 * np.sin(6 * xs[None, ..., None] + 4 * ys[None, ..., None] + phase)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _reference_scores(model, processor, images, prompts) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    inputs = processor(text=prompts, images=[Image.fromarray(i) for i in images],
                       padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    cosine = (out.text_embeds * out.image_embeds).sum(-1).numpy()
    return 100 * cosine, inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("height,width", [(24, 24), (40, 56), (64, 48), (17, 30)],
                         ids=["crop_only", "wide", "tall", "odd_upscale"])
def test_clip_score_matches_transformers(reference, height, width):
    model, processor, folder = reference
    scorer = metrics.load_clip_scorer(folder)
    images = _images(height * width, len(PROMPTS), height, width)
    want, want_pixels = _reference_scores(model, processor, images, PROMPTS)

    pixels = metrics.clip_preprocess(images, scorer.preprocessing)
    np.testing.assert_allclose(pixels, want_pixels, atol=1e-5)
    similarity = 100 * metrics.clip_similarity(scorer.config, scorer.params, scorer.tokenizer,
                                               images, PROMPTS)
    diff = float(np.max(np.abs(similarity - want)))
    MAX_DIFFS[f"{width}x{height} cosine x100"] = diff
    assert diff <= TOL
    scores = scorer(images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.maximum(want, 0.0), atol=TOL)
    assert (scores == 0).any() == (want < 0).any()


def test_clip_score_is_not_symmetric_in_pairing(reference):
    """Each image is scored against its own prompt, not against a mean of prompts."""
    _, _, folder = reference
    scorer = metrics.load_clip_scorer(folder)
    images = _images(3, 2, 24, 24)
    forward = metrics.clip_similarity(scorer.config, scorer.params, scorer.tokenizer, images,
                                      PROMPTS[:2])
    swapped = metrics.clip_similarity(scorer.config, scorer.params, scorer.tokenizer, images,
                                      PROMPTS[1::-1])
    assert not np.allclose(forward, swapped)
    one_prompt = scorer(images, PROMPTS[0])
    np.testing.assert_allclose(one_prompt, scorer(images, [PROMPTS[0]] * 2))


def test_native_clip_folder_round_trip(reference, tmp_path):
    _, _, folder = reference
    scorer = metrics.load_clip_scorer(folder)
    clip_weights.save_clip_native(tmp_path / "native", scorer.config, scorer.params, scorer.tokenizer)
    again = metrics.load_clip_scorer(tmp_path / "native")
    assert again.config == scorer.config
    images = _images(7, 3, 40, 40)
    np.testing.assert_array_equal(again(images, PROMPTS[:3]), scorer(images, PROMPTS[:3]))


def test_clip_score_errors_name_the_problem(reference, tmp_path):
    _, _, folder = reference
    scorer = metrics.load_clip_scorer(folder)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        scorer(_images(0, 2, 24, 24), PROMPTS[:3])
    with pytest.raises(ValueError, match="uint8"):
        scorer(np.zeros((1, 24, 24, 3), np.float32), "x")
    with pytest.raises(ValueError, match=str(tmp_path)):
        metrics.load_clip_scorer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        metrics.load_clip_scorer(tmp_path / "nowhere")


# --- diversity -------------------------------------------------------------------------------------

def test_diversity_of_identical_images_is_zero():
    image = _images(0, 1, 16, 16)
    assert metrics.diversity(np.repeat(image, 4, axis=0)) == 0.0


def test_diversity_known_values():
    black = np.zeros((1, 8, 8, 3), np.uint8)
    white = np.full((1, 8, 8, 3), 255, np.uint8)
    grey = np.full((1, 8, 8, 3), 51, np.uint8)  # 0.2 from black
    assert metrics.diversity(np.concatenate([black, white])) == pytest.approx(1.0)
    assert metrics.diversity(np.concatenate([black, grey])) == pytest.approx(0.2)
    # Pairs: black-white 1, black-grey 0.2, white-grey 0.8.
    assert metrics.diversity(np.concatenate([black, white, grey])) == pytest.approx(2.0 / 3.0)
    half = black.copy()
    half[:, :4] = 255  # half the pixels differ by 1: RMS sqrt(1/2)
    assert metrics.diversity(np.concatenate([black, half])) == pytest.approx(np.sqrt(0.5))


def test_diversity_orders_different_from_similar():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 16, 16, 3)).astype(np.uint8)
    jitter = rng.integers(-5, 6, (3, 16, 16, 3))
    similar = np.clip(base.astype(int) + jitter, 0, 255).astype(np.uint8)
    different = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    low, high = metrics.diversity(similar), metrics.diversity(different)
    assert 0.0 < low < 0.03 < 0.3 < high < 0.5  # uniform noise pairs: RMS ~ 0.41
    assert metrics.diversity(different[::-1]) == pytest.approx(high)


def test_diversity_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        metrics.diversity(np.zeros((1, 4, 4, 3), np.uint8))
