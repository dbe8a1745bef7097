"""The ControlNet shipped beside the embedded default model (sdjax/assets/controlnets/shapes_mask):
small, a folder diffusers' layout that loads onto the model, its masks place the object where a
prompt names no position, its scale is data; its recorded evaluation meets the target; and the
build that reproduces it, end to end at toy size."""
import json
import os
import pathlib

import numpy as np
import pytest

from sdjax import DEFAULT_MODEL
from sdjax.data import shapes
from sdjax.evaluation import default_model_controlnet as demo
from sdjax.evaluation.judge import judge

SHIPPED = pathlib.Path(DEFAULT_MODEL).parent / "controlnets" / "shapes_mask"
CONTROLNET = SHIPPED / demo.SHIPPED_FOLDER


def test_eval_scenes_name_no_position_and_masks_sit_where_the_scene_says():
    scenes = demo.eval_scenes(12, seed=1)
    assert len(set(scenes)) == 12 and all(o.position is None for s in scenes for o in s.objects)
    assert not any(shapes.is_held_out(demo.placed(s, "left")) for s in scenes)
    for position in shapes.POSITIONS:
        mask = demo.mask_of(demo.placed(scenes[0], position), 32)
        assert mask.shape == (32, 32, 3) and 0 <= mask.min() and mask.max() == 1.0
        # The mask, drawn as an image of a white object on black, is judged at its position.
        verdict = judge(np.round(mask * 255).astype(np.uint8),
                        shapes.Scene((shapes.ShapeAttrs(scenes[0].objects[0].shape, "white",
                                                        scenes[0].objects[0].size, position),),
                                     "black"))
        assert verdict["position"] and verdict["shape"], position


def test_shipped_controlnet_is_small_and_loads_onto_the_default_model():
    from sdjax.weights.controlnet import load_controlnet
    from sdjax.weights.pretrained import load_pretrained

    files = [f for f in CONTROLNET.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 5 * 2 ** 20
    model = load_pretrained(DEFAULT_MODEL)
    controlnet = load_controlnet(CONTROLNET, base=model.unet_config)
    assert controlnet.config.block_out_channels == model.unet_config.block_out_channels
    assert controlnet.config.conditioning_factor == 2 ** (len(model.vae_config.block_out_channels) - 1)
    for position in shapes.POSITIONS:
        assert (SHIPPED / "masks" / f"{position}.png").is_file()


@pytest.fixture(scope="module")
def drawings():
    """Four scenes at every position with the shipped ControlNet, and the same without control."""
    from configs import shapes as shapes_config
    from sdjax.evaluation import default_model
    from sdjax.sampling.controls import Control
    from sdjax.sampling.generator import Generator
    from sdjax.weights.pretrained import load_pretrained

    model = load_pretrained(DEFAULT_MODEL)
    generator = Generator(model, exported_programs=False)
    config = shapes_config.get_config()
    scenes = demo.eval_scenes(4, seed=123)
    prompts = [shapes.caption(s) for s in scenes for _ in shapes.POSITIONS]
    truths = [demo.placed(s, p) for s in scenes for p in shapes.POSITIONS]
    masks = [demo.mask_of(t, 32) for t in truths]
    controls = [Control(str(CONTROLNET), masks, scale=[1.0] * len(prompts))]
    with_control, images, _ = default_model.generate_and_judge(
        model, prompts, config, seed=5, generator=generator, judged=truths, controls=controls)
    traces = generator.traces
    zero = [Control(str(CONTROLNET), masks, scale=[0.0] * len(prompts))]
    _, at_zero, _ = default_model.generate_and_judge(model, prompts, config, seed=5,
                                                     generator=generator, controls=zero)
    _, plain, _ = default_model.generate_and_judge(model, prompts, config, seed=5,
                                                   generator=generator)
    return {"with_control": with_control, "images": images, "at_zero": at_zero, "plain": plain,
            "traces_for_new_scales": generator.traces - traces - 1}


def test_the_mask_places_the_object(drawings):
    assert drawings["with_control"]["per_attribute"]["position"] >= 0.85, drawings["with_control"]


def test_control_scale_is_data_and_zero_draws_as_the_model_alone(drawings):
    # A new scale reuses the program; only the drawing without ControlNets is a new one.
    assert drawings["traces_for_new_scales"] == 0
    assert np.abs(drawings["at_zero"].astype(int) - drawings["plain"].astype(int)).max() <= 1
    assert np.abs(drawings["images"].astype(int) - drawings["plain"].astype(int)).max() > 64


def test_recorded_controlnet_evaluation_meets_its_target():
    results = json.loads((SHIPPED / "evaluation.json").read_text())
    assert results["position_follows_control"] >= demo.TARGETS["position_follows_control"]
    assert results["meets_targets"] == {"position_follows_control": True}
    assert results["drawings"] == results["scenes"] * len(shapes.POSITIONS) >= 200
    build = json.loads((SHIPPED / "build.json").read_text())
    assert build["stages"]["train"]["seconds"] <= 30 * 60
    for name in ("README.md", "samples.png", "grid.png", "logs/metrics.jsonl"):
        assert (SHIPPED / name).is_file(), name


@pytest.mark.slow  # compiles a ControlNet train step on the default model and the sampling program
def test_toy_controlnet_build_trains_exports_evaluates_and_writes_the_folder(tmp_path):
    from configs import default_model_controlnet, shapes as shapes_config

    config = default_model_controlnet.get_config("1")
    config.controlnet.shapes_examples = 16
    config.data.batch_size = 8
    config.checkpoint.async_save = False
    out = tmp_path / "shapes_mask"
    record = demo.build_controlnet(config, shapes_config.get_config(), str(tmp_path / "work"),
                                   str(out), num_scenes=2)
    assert record["stages"]["train"]["steps"] == 1
    for name in ("controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
                 "evaluation.json", "build.json", "README.md", "samples.png", "grid.png",
                 "masks/left.png", "logs/metrics.jsonl", "logs/config.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "evaluation.json").read_text())
    assert results["drawings"] == 10 and results["programs_traced"] <= 2
    assert not os.path.exists(str(out) + ".partial")
