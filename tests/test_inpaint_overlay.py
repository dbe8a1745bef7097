"""Inpainting keeps the init image outside the (blurred) mask, as the WebUI's overlay does; the
overlay and its blur are data, so toggling them never recompiles."""
import numpy as np
import pytest

from sdjax.sampling import Generator, Request, SamplingSpec
from sdjax.sampling.requests import blur_mask

SIZE = 32
SPEC = SamplingSpec(sampler="euler", steps=2, height=SIZE, width=SIZE, mode="inpaint")


@pytest.fixture(scope="module")
def generator(tiny_model):
    return Generator(tiny_model, exported_programs=False)


@pytest.fixture(scope="module")
def init_and_mask():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[10:18, 12:20] = 1
    return image, mask


def _draw(generator, image, mask, **fields):
    return generator(Request("a red circle", seed=3, init_image=image, mask=mask, **fields),
                     SPEC)["images"][0]


def test_pixels_away_from_the_mask_are_the_init_image_exactly(generator, init_and_mask):
    image, mask = init_and_mask
    out = _draw(generator, image, mask)
    weight = blur_mask(mask, 4.0)
    outside = weight == 0
    assert outside.sum() > 200 and (weight[mask == 1] == 1).all()
    np.testing.assert_array_equal(out[outside], image[outside])
    assert np.abs(out[mask == 1] - image[mask == 1]).mean() > 0.05


def test_without_the_overlay_the_vae_changes_pixels_outside_the_mask(generator, init_and_mask):
    image, mask = init_and_mask
    traces = generator.traces
    out = _draw(generator, image, mask, inpaint_overlay=False)
    assert np.abs(out[mask == 0] - image[mask == 0]).mean() > 0.01
    sharp = _draw(generator, image, mask, mask_blur=0.0)
    np.testing.assert_array_equal(sharp[mask == 0], image[mask == 0])
    assert generator.traces == traces


def test_blur_reaches_a_few_pixels_beyond_the_mask():
    mask = np.zeros((16, 16), np.float32)
    mask[6:10, 6:10] = 1
    weight = blur_mask(mask, 2.0)
    assert (weight[mask == 1] == 1).all()
    assert 0 < weight[6, 4] < 1 and weight[6, 0] < weight[6, 4]
    np.testing.assert_array_equal(blur_mask(mask, 0), mask)


def test_a_negative_blur_is_refused(generator, init_and_mask):
    image, mask = init_and_mask
    with pytest.raises(ValueError, match="mask_blur must be a finite radius >= 0, got -1"):
        _draw(generator, image, mask, mask_blur=-1)
