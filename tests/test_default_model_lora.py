"""The shapes world's extension vocabulary (a heart: rendered, parsed and judged, never in the base
world's data) and the LoRA that teaches it to the embedded default model: the shipped kohya file
(small, loads onto the model, draws hearts the base model cannot, its weight is data), its recorded
evaluation, and the build that reproduces it, end to end at toy size."""
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdjax import DEFAULT_MODEL
from sdjax.data import shapes
from sdjax.data.shapes import Scene, ShapeAttrs, parse_caption
from sdjax.evaluation.judge import detect, judge
from tests.helpers import take

LORA_DIR = pathlib.Path(DEFAULT_MODEL) / "loras"
LORA = LORA_DIR / "heart.safetensors"


# --- the extension vocabulary ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_stream():
    return take(shapes.lora_examples(0), 1500)


def _hearts(scene: Scene) -> int:
    return sum(o.shape in shapes.EXTRA_SHAPES for o in scene.objects)


def test_base_world_never_draws_an_extension_shape(shapes_train_examples):
    from sdjax.data.shapes_dataset import vocabulary_token_ids
    from sdjax.text.tokenizer import CLIPTokenizer

    assert shapes.EXTRA_SHAPES == ("heart",) and not set(shapes.EXTRA_SHAPES) & set(shapes.SHAPES)
    assert not any(_hearts(e.scene) for e in shapes_train_examples)
    assert not any(_hearts(e.scene) for e in take(shapes.heldout_examples(0), 300))
    assert not any("heart" in p for p in shapes.heldout_prompts())
    # The default model's text encoder trained only the base words' embedding rows.
    tokenizer = CLIPTokenizer.default()
    heart = tokenizer(["heart"])[0][1]
    assert heart not in vocabulary_token_ids(tokenizer)


def test_heart_is_one_token_of_the_default_model_tokenizer():
    from sdjax.weights.pretrained import load_pretrained

    ids = load_pretrained(DEFAULT_MODEL).tokenizers[0](["a red heart", "a red circle"])
    assert (ids[0] != ids[1]).sum() == 1  # "heart" takes the one place "circle" does


def test_heart_captions_parse_and_render_inside_their_box():
    scene = parse_caption("a small red heart on the left and a large blue square on the right, "
                          "white background")
    assert scene.objects == (ShapeAttrs("heart", "red", "small", "left"),
                             ShapeAttrs("square", "blue", "large", "right"))
    image = shapes.render(scene)
    assert (image[0] == shapes.COLOURS["white"]).all()
    # The heart touches all four sides of its box, as the base shapes do.
    box = (10.0, 20.0, 110.0, 120.0)
    cover = shapes.shape_coverage("heart", box, 128, 128, supersample=1) > 0
    rows, cols = np.nonzero(cover.any(1))[0], np.nonzero(cover.any(0))[0]
    assert (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1) == pytest.approx((10, 110, 20, 120), abs=1)
    # Lobes on top, the point at the bottom.
    assert cover[21:30].sum() > 2 * cover[110:119].sum()


def _blur_noise(image, rng):
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)))
    return np.clip(blurred + rng.normal(0, 8, image.shape), 0, 255).round().astype(np.uint8)


def test_judge_agrees_with_truth_on_heart_scenes(lora_stream):
    hearts = [e for e in lora_stream if _hearts(e.scene)][:400]
    rng = np.random.default_rng(0)
    clean = np.mean([judge(e.image, e.scene)["all_correct"] for e in hearts])
    rough = np.mean([judge(_blur_noise(e.image, rng), e.scene)["all_correct"] for e in hearts])
    assert clean >= 0.99 and rough >= 0.95, (clean, rough)


@pytest.mark.parametrize("size", shapes.SIZES)
def test_judge_tells_a_heart_from_each_base_shape(size):
    rng = np.random.default_rng(1)
    for shape in shapes.ALL_SHAPES:
        for position in shapes.POSITIONS:
            scene = Scene((ShapeAttrs(shape, "yellow", size, position),), "blue")
            image = _blur_noise(shapes.render(scene), rng)
            assert [o.shape for o in detect(image).objects] == [shape], (shape, position)


def test_lora_examples_mix_hearts_with_ordinary_scenes_and_keep_held_out_prompts_out(lora_stream):
    held_out = set(shapes.extra_heldout_prompts())
    scenes = [e.scene for e in lora_stream]
    with_hearts = [s for s in scenes if _hearts(s)]
    assert 0.4 <= len(with_hearts) / len(scenes) <= 0.6
    assert {len(s.objects) for s in with_hearts} == {1, 2}
    assert any(_hearts(s) == 2 for s in with_hearts)
    hearts = [o for s in with_hearts for o in s.objects if o.shape == "heart"]
    assert {o.colour for o in hearts} == set(shapes.COLOURS)
    assert {s.background for s in with_hearts} == set(shapes.COLOURS)
    assert {(o.size, o.position) for o in hearts} == {(z, p) for z in shapes.SIZES
                                                      for p in shapes.POSITIONS}
    assert not any(shapes.is_held_out(s) for s in scenes)
    assert not any(shapes.caption(s) in held_out for s in scenes)
    # Captions in the full form and as people write them, each true of its scene.
    assert any(e.caption == shapes.caption(e.scene) for e in lora_stream)
    assert any(e.caption != shapes.caption(e.scene) for e in lora_stream)
    for e in lora_stream:
        said = parse_caption(e.caption)
        assert said.background in (None, e.scene.background)
        for got, true in zip(said.objects, e.scene.objects):
            assert (got.colour, got.shape) == (true.colour, true.shape)
            assert got.size in (None, true.size) and got.position in (None, true.position)
    assert [e.caption for e in take(shapes.lora_examples(0), 50)] == \
        [e.caption for e in lora_stream[:50]]
    assert [e.caption for e in take(shapes.lora_examples(1), 50)] != \
        [e.caption for e in lora_stream[:50]]


def test_extra_heldout_prompts_are_a_fixed_fifth_that_leaves_every_attribute_trained():
    everything, held_out = shapes.extra_prompts(), shapes.extra_heldout_prompts()
    assert len(everything) == len(set(everything)) == 560 and len(held_out) == 112
    assert held_out == shapes.extra_heldout_prompts() and set(held_out) < set(everything)
    trained = [parse_caption(p) for p in everything if p not in set(held_out)]
    for attribute, values in (("colour", shapes.COLOURS), ("size", shapes.SIZES),
                              ("position", shapes.POSITIONS)):
        assert {getattr(s.objects[0], attribute) for s in trained} == set(values)
    assert {s.background for s in trained} == set(shapes.COLOURS)


def test_lora_examples_folder_keeps_the_streams_captions(tmp_path):
    from sdjax.data.shapes_dataset import MANIFEST, write_shapes_folder

    folder = write_shapes_folder(tmp_path / "lora", 30, seed=2, examples=shapes.lora_examples)
    stream = take(shapes.lora_examples(2), 30)
    for i, e in enumerate(stream):
        assert (folder / f"{i:06d}.txt").read_text().strip() == e.caption
        assert np.array_equal(np.asarray(Image.open(folder / f"{i:06d}.png")), e.image)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["examples"] == "sdjax.data.shapes:lora_examples"


# --- the shipped LoRA ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_model():
    from sdjax.weights.pretrained import load_pretrained

    return load_pretrained(DEFAULT_MODEL)


def test_shipped_lora_is_a_small_kohya_file_that_loads_onto_the_default_model(default_model):
    from safetensors import safe_open

    from sdjax.adapters.formats import load_adapter

    assert LORA.stat().st_size <= 450 * 1024  # a few hundred KB: float32 factors, rank 4 and 8
    with safe_open(str(LORA), "np") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert {k.split("_")[1] for k in keys} == {"unet", "te"}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert metadata["ss_network_module"] == "networks.lora"
    adapter = load_adapter(LORA, default_model)
    assert adapter.targets == ("unet", "text_encoder")
    assert adapter.num_layers() == len(keys) // 3


# Held-out heart prompts (never in the LoRA's training data), drawn at the evaluation's settings.
DRAWN_PROMPTS = 4


@pytest.fixture(scope="module")
def drawings(default_model):
    """The first held-out heart prompts, drawn by one Generator with the shipped LoRA at weight 0
    and at weight 1."""
    from configs import shapes as shapes_config
    from sdjax import images as images_lib
    from sdjax.evaluation.default_model_lora import CONCEPT_SEED
    from sdjax.sampling import Generator, Request
    from sdjax.sampling.generate import spec_from_config

    config = shapes_config.get_config()
    spec = spec_from_config(config)
    generator = Generator(default_model, exported_programs=False)
    prompts = shapes.extra_heldout_prompts()[::28][:DRAWN_PROMPTS]
    images = {}
    for weight in (0.0, 1.0):
        out = generator(Request(prompt=prompts, num_images=len(prompts), seed=CONCEPT_SEED,
                                cfg_scale=config.cfg_scale, adapters=((str(LORA), weight),)), spec)
        images[weight] = images_lib.to_uint8(out["images"])
    return prompts, images, generator.traces


def test_shipped_lora_draws_hearts_the_base_model_cannot(drawings):
    prompts, images, _ = drawings
    with_lora = [judge(i, p) for i, p in zip(images[1.0], prompts)]
    without = [judge(i, p) for i, p in zip(images[0.0], prompts)]
    assert sum(v["all_correct"] for v in with_lora) >= DRAWN_PROMPTS - 1, with_lora
    assert sum(v["shape"] for v in without) <= 1, without


def test_lora_weight_is_data_not_a_new_program(drawings):
    _, _, traces = drawings
    assert traces == 1


def test_recorded_lora_evaluation_meets_its_targets():
    results = json.loads((LORA_DIR / "evaluation.json").read_text())
    assert results["concept_prompts"] == 112 and results["base_heldout_prompts"] == 280
    assert results["concept_accuracy"] >= 0.90
    assert abs(results["base_heldout_accuracy_at_weight_0"]
               - results["base_heldout_accuracy_without_lora"]) <= 0.03
    assert results["programs_traced"] <= 1  # 0 where a stored exported program was loaded
    build = json.loads((LORA_DIR / "build.json").read_text())
    assert build["stages"]["train"]["steps"] > 0 and build["total_seconds"] <= 20 * 60
    readme = (LORA_DIR / "README.md").read_text()
    assert "python -m experiments.train_default_model_lora" in readme
    assert "--lora=sdjax/assets/default_model/loras/heart.safetensors" in readme


# --- the build at toy size -------------------------------------------------------------------------

@pytest.mark.slow  # compiles a LoRA train step on the default model and the sampling program
def test_toy_lora_build_trains_exports_evaluates_and_writes_the_folder(tmp_path):
    from configs import default_model_lora, shapes as shapes_config
    from sdjax.evaluation.default_model_lora import build_lora

    config = default_model_lora.get_config("1")
    config.shapes_data.num_examples = 16
    config.data.batch_size = 8
    config.checkpoint.async_save = False
    out = tmp_path / "loras"
    record = build_lora(config, shapes_config.get_config(), str(tmp_path / "work"), str(out),
                        num_eval_prompts=2)
    assert record["stages"]["train"]["steps"] == 1
    for name in ("heart.safetensors", "evaluation.json", "build.json", "README.md",
                 "samples.png", "logs/metrics.jsonl", "logs/config.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "evaluation.json").read_text())
    assert results["concept_prompts"] == 2 and results["programs_traced"] <= 1
    assert not os.path.exists(str(out) + ".partial")
