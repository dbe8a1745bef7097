"""Image I/O helpers: conversion, PNG parameters, grids, input errors."""
import numpy as np
import pytest
from PIL import Image

from sdjax import images


def test_uint8_round_trip_and_rounding():
    x = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5, -3.0], np.float32)
    u = images.to_uint8(x)
    assert u.tolist() == [0, 64, 128, 255, 255, 255, 0]
    np.testing.assert_allclose(images.from_uint8(images.to_uint8(np.linspace(-1, 1, 256))),
                               np.linspace(-1, 1, 256), atol=1 / 127.5)


def test_png_carries_parameters(tmp_path):
    path = tmp_path / "a.png"
    text = images.format_parameters("a cat", "blurry", {"Steps": 20, "Seed": 7})
    images.save_png(np.zeros((8, 8, 3), np.uint8), path, text)
    assert images.read_parameters(path) == "a cat\nNegative prompt: blurry\nSteps: 20, Seed: 7"
    assert not list(tmp_path.glob("*.tmp"))


def test_grid_layout_with_labels():
    tiles = [np.full((10, 12, 3), 40 * i, np.uint8) for i in range(6)]
    plain = images.grid(tiles, rows=2, pad=0)
    assert plain.shape == (20, 36, 3)
    assert (plain[10:, 24:] == 200).all()  # last tile, bottom right
    labelled = images.grid(tiles, rows=2, row_labels=["r0", "r1"], col_labels=["a", "b", "c"])
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]


def test_load_image_resizes_and_names_bad_files(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(path)
    image = images.load_image(path, (16, 24))
    assert image.shape == (16, 24, 3) and np.allclose(image, 1.0)
    with pytest.raises(FileNotFoundError, match="init image .*nope.png"):
        images.load_image(tmp_path / "nope.png", what="init image")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png.*cannot be read"):
        images.load_image(bad)


def test_mask_must_match_image(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(path)
    assert images.load_mask(path, (16, 16)).sum() == 256
    with pytest.raises(ValueError, match="mask .* is 16x16 but the image is 24x16"):
        images.load_mask(path, (16, 24))
