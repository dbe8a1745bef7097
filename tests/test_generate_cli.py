"""`python -m experiments.generate`: files, PNG parameters, grid, resolved config, and one-line errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from sdjax import images
from tests.helpers import run_python


def _run(*args):
    return run_python("-m", "experiments.generate", "--model=random:tiny", "--height=32",
                      "--width=32", "--config.steps=3", "--config.progress=false", *args)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("generate")
    result = _run("--prompt=a red circle", "--negative_prompt=blurry", "--num_images=3",
                  "--seed=7", "--cfg_scale=5", "--config.sampler=euler_a", f"--out_dir={out_dir}",
                  f"--config.compilation_cache={out_dir / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir, result


def test_writes_one_png_per_image_with_parameters_a_grid_and_the_config(generated):
    out_dir, result = generated
    pngs = sorted(p for p in os.listdir(out_dir) if p[0].isdigit())
    assert pngs == ["00000-7.png", "00001-8.png", "00002-9.png"]
    text = images.read_parameters(out_dir / "00001-8.png")
    assert text.startswith("a red circle\nNegative prompt: blurry\n")
    assert "Steps: 3, Sampler: euler_a, CFG scale: 5.0, Seed: 8, Size: 32x32" in text
    assert Image.open(out_dir / "grid.png").size[0] > 32
    config = json.loads((out_dir / "config.json").read_text())
    assert config["sampler"] == "euler_a" and config["seed"] == 7 and config["num_images"] == 3
    tiles = [np.asarray(Image.open(out_dir / p)) for p in pngs]
    assert len({t.tobytes() for t in tiles}) == 3


def test_image_is_the_same_when_drawn_alone(generated, tmp_path):
    out_dir, _ = generated
    result = _run("--prompt=a red circle", "--negative_prompt=blurry", "--seed=8", "--cfg_scale=5",
                  "--config.sampler=euler_a", f"--out_dir={tmp_path}",
                  f"--config.compilation_cache={out_dir / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    alone = np.asarray(Image.open(tmp_path / "00000-8.png"))
    np.testing.assert_array_equal(alone, np.asarray(Image.open(out_dir / "00001-8.png")))


@pytest.mark.parametrize("args, message", [
    (["--height=30"], "height must be a positive multiple of 8, got 30"),
    (["--config.sampler=nope"], "unknown sampler 'nope'; valid names: ddim, ddpm"),
    (["--config.steps=0"], "steps must be >= 1, got 0"),
    (["--init_image=/nonexistent.png"], "init image '/nonexistent.png' does not exist"),
    (["--mask=/m.png"], "--mask needs --init_image"),
    (["--config.no_such_field=1"], "bad --config override (--config.no_such_field=1)"),
    (["--config.sampler=euler_a:karras=true"], "sampler 'euler_a' has no option(s) ['karras']"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    result = _run("--prompt=x", f"--out_dir={tmp_path}", *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_strength_outside_range_is_refused(tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = _run("--prompt=x", f"--out_dir={tmp_path}", f"--init_image={image}", "--strength=1.5")
    assert result.returncode != 0
    assert "strength must be in (0, 1], got 1.5" in result.stderr
