"""`sdjax.preprocessors.control_image`: canny is OpenCV's, mask thresholds, "none" keeps arrays,
and resizing is diffusers' control image processor's (PIL Lanczos)."""
import builtins

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdjax import preprocessors

cv2 = pytest.importorskip("cv2")


def drawing(width=48, height=40) -> Image.Image:
    """Shapes with hard and soft edges: canny finds some edges at one threshold pair, not another."""
    image = Image.new("RGB", (width, height), (20, 40, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 6, 26, 30), fill=(230, 30, 30))
    draw.rectangle((28, 4, 44, 20), fill=(32, 52, 206))  # a faint edge against the background
    draw.line((0, height - 4, width, 10), fill=(255, 255, 0), width=2)
    return image


def test_canny_is_opencvs_canny_of_the_image_repeated_to_rgb():
    image = drawing()
    out = preprocessors.control_image(image, 40, 48, preprocess="canny")
    edges = cv2.Canny(np.asarray(image), *preprocessors.CANNY_THRESHOLDS)
    assert edges.any() and not edges.all()
    np.testing.assert_array_equal(out, np.repeat(edges[..., None], 3, axis=2) / np.float32(255))
    assert out.dtype == np.float32


def test_canny_thresholds_pass_through_to_opencv():
    image = drawing()
    low = cv2.Canny(np.asarray(image), 10, 30)
    high = cv2.Canny(np.asarray(image), 150, 300)
    assert (low != high).any()  # the drawing tells the thresholds apart
    for (a, b), edges in (((10, 30), low), ((150, 300), high)):
        out = preprocessors.control_image(image, 40, 48, preprocess="canny", channels=1,
                                          low_threshold=a, high_threshold=b)
        np.testing.assert_array_equal(out[..., 0], edges / np.float32(255))


def test_canny_without_opencv_is_one_line_naming_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    for check in (lambda: preprocessors.control_image(drawing(), 40, 48, preprocess="canny"),
                  lambda: preprocessors.check_preprocess("canny")):  # what the CLI checks first
        with pytest.raises(ValueError) as err:
            check()
        assert "\n" not in str(err.value)
        assert "needs OpenCV: pip install 'sdjax[control]'" in str(err.value)
    preprocessors.check_preprocess("mask")  # the others need no OpenCV


def test_mask_thresholds_brightness_at_mid_grey():
    gray = np.array([[0, 127, 128, 255], [64, 200, 10, 128]], np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    out = preprocessors.control_image(rgb, 2, 4, preprocess="mask", channels=1)
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 1, 1], [0, 1, 0, 1]])
    three = preprocessors.control_image(rgb, 2, 4, preprocess="mask")
    np.testing.assert_array_equal(three, np.repeat(out, 3, axis=2))


def test_none_passes_arrays_of_the_drawn_size_through_exactly():
    rng = np.random.default_rng(0)
    floats = rng.uniform(0, 1, (16, 24, 3)).astype(np.float32)
    out = preprocessors.control_image(floats, 16, 24)
    np.testing.assert_array_equal(out, floats)  # no 8-bit rounding
    one = rng.uniform(0, 1, (16, 24)).astype(np.float32)
    np.testing.assert_array_equal(preprocessors.control_image(one, 16, 24, channels=1),
                                  one[..., None])
    uint8 = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocessors.control_image(uint8, 16, 24),
                                  uint8 / np.float32(255))


def test_resizing_is_diffusers_control_image_processor(tmp_path):
    import torch
    from diffusers.image_processor import VaeImageProcessor

    image = drawing(width=53, height=37)  # another size and aspect than the drawn 24x40
    path = tmp_path / "control.png"
    image.save(path)
    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    reference = processor.preprocess(image, height=24, width=40)
    assert isinstance(reference, torch.Tensor) and reference.shape == (1, 3, 24, 40)
    reference = reference[0].permute(1, 2, 0).numpy()
    for source in (image, path, np.asarray(image)):
        out = preprocessors.control_image(source, 24, 40)
        assert out.shape == (24, 40, 3)
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-7)
    # An RGBA file is made RGB first, as diffusers' do_convert_rgb does.
    rgba = image.convert("RGBA")
    np.testing.assert_allclose(
        preprocessors.control_image(rgba, 24, 40),
        processor.preprocess(rgba, height=24, width=40)[0].permute(1, 2, 0).numpy(), atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image="/nonexistent/c.png"), "control image: /nonexistent/c.png: no such file"),
    (dict(preprocess="sobel"), "unknown preprocess 'sobel'; choose one of none, mask, canny"),
    (dict(image=np.full((8, 8), 2.0)), "a float array must hold values in [0, 1]"),
    (dict(image=np.zeros((8, 8, 2))), "an array must be (H, W) or (H, W, 1|3|4)"),
])
def test_bad_control_images_are_one_line_errors(kwargs, message):
    kwargs = {"image": drawing(), **kwargs}
    with pytest.raises(ValueError) as err:
        preprocessors.control_image(height=8, width=8, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    path = tmp_path / "c.png"
    path.write_text("not a png")
    with pytest.raises(ValueError, match=f"control image: {path}: not an image"):
        preprocessors.control_image(path, 8, 8)
