"""The ablation runner on the random tiny model: tables, grids, plots, compilation count, resume;
and on the tiny SD3 and Flux models: skip-layer guidance variants, the distilled-guidance axis,
samplers with options.

One Generator per model serves every sweep of the module, so each (sampler, steps, interval)
program is compiled once for the whole file.
"""
import csv
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import ablate as ablate_config
from sdjax import images as images_lib
from sdjax.diffusion.samplers import parse_sampler
from sdjax.evaluation import ablation, metrics
from sdjax.weights import clip as clip_weights
from sdjax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from sdjax.weights.presets import random_pretrained
from sdjax.sampling import Generator, SamplingSpec
from sdjax.text.tokenizer import CLIPTokenizer
from sdjax.weights.clip import clip_text_shapes, clip_vision_shapes
from sdjax.weights.controlnet import save_controlnet
from tests.controlnet_sampling_check import random_controlnet

SIZE = 32
SAMPLERS = ("euler", "ddim")
STEPS = (2, 3)
SCALES = (1.0, 7.5)
VARIANTS = ("cfg", "rescale=0.7")        # rescale is data: both share a program
OTHER_PROMPTS = ("a photo of a cat", "a lighthouse at dusk, oil painting")


def _config(out_dir, **overrides):
    config = ablate_config.get_config("tiny")
    with config.unlocked():
        config.samplers, config.steps, config.cfg_scales, config.variants = (
            SAMPLERS, STEPS, SCALES, VARIANTS)
        config.num_prompts, config.num_seeds = 2, 2
        config.height = config.width = SIZE
        config.out_dir = str(out_dir)
        config.compilation_cache = ""
    return _override(config, overrides)


def _override(config, overrides: dict):
    """`config` with `overrides` ("field" or "group.field": value) set."""
    with config.unlocked():
        for key, value in overrides.items():
            if "." in key:
                group, field = key.split(".")
                config[group][field] = value
            else:
                config[key] = value
    return config


@pytest.fixture(scope="module")
def generator():
    return Generator(random_pretrained("tiny"))


@pytest.fixture(scope="module")
def shapes_sweep(tmp_path_factory, generator):
    """2 samplers x 2 step counts x 2 variants x 2 scales over 2 shapes prompts x 2 seeds."""
    out_dir = tmp_path_factory.mktemp("shapes_sweep")
    config = _config(out_dir)
    return config, ablation.run_sweep(config, generator=generator)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random sdjax CLIP saved as a native folder (what --clip_model points at)."""
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2, projection_dim=16)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                              image_size=24, patch_size=8, projection_dim=16)
    config = CLIPConfig(text=text, vision=vision)
    # Random normal leaves of the model's abstract params: tracing a real init takes ~10 s here.
    rng = np.random.default_rng(0)
    abstract = {"text_model": clip_text_shapes(text), "vision_model": clip_vision_shapes(vision),
                "logit_scale": jax.ShapeDtypeStruct((), np.float32)}
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), abstract)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    clip_weights.save_clip_native(folder, config, params, CLIPTokenizer.default())
    return folder


@pytest.fixture(scope="module")
def other_sweep(tmp_path_factory, generator, clip_folder):
    """Prompts that are not shapes prompts, a CLIP model, guidance-interval variants."""
    out_dir = tmp_path_factory.mktemp("other_sweep")
    config = _config(out_dir, samplers=("euler",), steps=(2,), prompts=OTHER_PROMPTS,
                     variants=("cfg", "interval=0.2:0.8", "rescale=0.5,interval=0.2:0.8"),
                     clip_model=str(clip_folder), **{"grid.x": "variant", "grid.y": "prompt"})
    return config, ablation.run_sweep(config, generator=generator)


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_tables_have_a_row_per_cell_and_judge_columns(shapes_sweep):
    config, result = shapes_sweep
    columns, rows = _read_csv(result["csv"])
    assert columns == ["sampler", "steps", "variant", "cfg_scale", "images", "nonfinite", "judged",
                       "acc_colour", "acc_shape", "acc_position", "acc_size", "acc_background",
                       "acc_count", "all_correct", "diversity", "sec_per_image"]
    cells = [(s, str(n), v, str(g))
             for s in SAMPLERS for n in STEPS for v in VARIANTS for g in SCALES]
    assert [(r["sampler"], r["steps"], r["variant"], r["cfg_scale"]) for r in rows] == cells
    records = ablation.read_records(config.out_dir)
    assert len(records) == len(cells) * 2
    for row in rows:
        assert row["images"] == "4" and row["judged"] == "4"
        for column in columns[7:15]:
            assert 0.0 <= float(row[column]) <= 1.0, column
        assert float(row["sec_per_image"]) > 0
        mine = [r for r in records if (r["sampler"], str(r["steps"]), r["variant"],
                                       str(r["cfg_scale"])) == tuple(list(row.values())[:4])]
        assert int(row["nonfinite"]) == sum(not f for r in mine for f in r["finite"])
        judged = [j["all_correct"] for r in mine for j in r["judge"]]
        assert float(row["all_correct"]) == pytest.approx(np.mean(judged))
    with open(result["markdown"]) as f:
        text = f.read()
    table = [line for line in text.split("\n\n")[3].splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(columns) + " |"
    assert len(table) == 2 + len(cells)
    if len(STEPS) > 1:
        assert "## Steps each setting needs" in text


def test_compiles_one_program_per_sampler_and_steps(shapes_sweep, generator):
    _, result = shapes_sweep
    assert result["programs"] == len(SAMPLERS) * len(STEPS)
    assert result["traces"] == len(SAMPLERS) * len(STEPS)
    assert result["generated"] == len(SAMPLERS) * len(STEPS) * len(VARIANTS) * len(SCALES) * 2


def test_guidance_scales_change_the_images(shapes_sweep):
    config, _ = shapes_sweep
    records = ablation.read_records(config.out_dir)
    prompt = records[0]["prompt"]
    by_scale = {r["cfg_scale"]: r for r in records
                if (r["sampler"], r["steps"], r["variant"], r["prompt"])
                == ("euler", 2, "cfg", prompt)}
    assert all(by_scale[1.0]["finite"] + by_scale[7.5]["finite"])
    assert not np.array_equal(ablation._load_images(config.out_dir, by_scale[1.0]),
                              ablation._load_images(config.out_dir, by_scale[7.5]))


def test_grids_have_one_tile_per_cell_with_labels(shapes_sweep):
    config, result = shapes_sweep
    grids = result["grids"]
    # x = cfg_scale, y = sampler: one grid per (steps, variant, prompt).
    assert len(grids) == len(STEPS) * len(VARIANTS) * 2
    assert {(g["fixed"]["steps"], g["fixed"]["variant"]) for g in grids} == {
        (n, v) for n in STEPS for v in VARIANTS}
    with open(os.path.join(config.out_dir, "grids", "grids.json")) as f:
        assert json.load(f) == grids
    records = {ablation._key_of_record(r): r for r in ablation.read_records(config.out_dir)}
    for entry in grids:
        assert (entry["rows"], entry["cols"], entry["tiles"]) == (2, 2, 4)
        assert entry["row_labels"] == list(SAMPLERS)
        assert entry["col_labels"] == ["CFG 1", "CFG 7.5"]
        assert entry["tile_size"] == [SIZE, 2 * SIZE]       # the two seeds side by side
        canvas = np.asarray(Image.open(os.path.join(config.out_dir, entry["file"])))
        expected = images_lib.grid([np.zeros((SIZE, 2 * SIZE, 3), np.uint8)] * 4, rows=2,
                                   row_labels=entry["row_labels"], col_labels=entry["col_labels"])
        assert canvas.shape == expected.shape
        pad = 2
        left = canvas.shape[1] - 2 * (2 * SIZE + pad) - pad
        top = canvas.shape[0] - 2 * (SIZE + pad) - pad
        assert left > 0 and top > 0                          # room for the labels
        for r, sampler in enumerate(SAMPLERS):
            for c, scale in enumerate(SCALES):
                key = (sampler, entry["fixed"]["steps"], entry["fixed"]["variant"], scale,
                       entry["fixed"]["prompt"])
                seeds = ablation._load_images(config.out_dir, records[key])
                want = np.concatenate(list(seeds), axis=1)
                y, x = top + pad + r * (SIZE + pad), left + pad + c * (2 * SIZE + pad)
                np.testing.assert_array_equal(canvas[y:y + SIZE, x:x + 2 * SIZE], want)


def test_plots_are_written(shapes_sweep):
    pytest.importorskip("matplotlib")
    _, result = shapes_sweep
    names = sorted(os.path.basename(p) for p in result["plots"])
    assert names == ["all_correct_vs_guidance.png", "all_correct_vs_steps.png",
                     "diversity_vs_guidance.png", "diversity_vs_steps.png"]
    for path in result["plots"]:
        assert Image.open(path).size[0] > 300


def test_plots_without_matplotlib_warn(shapes_sweep, tmp_path, monkeypatch, caplog):
    config, result = shapes_sweep
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    sweep = ablation.Sweep.from_config(config)
    with caplog.at_level("WARNING"):
        assert ablation.write_plots(str(tmp_path), sweep, result["rows"], result["columns"]) == []
    assert "matplotlib is not installed" in caplog.text


def test_resume_skips_finished_pairs(shapes_sweep, generator):
    config, first = shapes_sweep
    again = ablation.run_sweep(config, generator=generator)
    assert (again["generated"], again["traces"]) == (0, 0)
    assert again["skipped"] == first["generated"]
    assert again["rows"] == first["rows"]
    # Lose the last record, as if the run had stopped before it: only that pair is drawn again.
    path = os.path.join(config.out_dir, ablation.RECORDS)
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:-1] + [lines[-1][:20]])         # and a torn last line
    resumed = ablation.run_sweep(config, generator=generator)
    assert (resumed["generated"], resumed["traces"]) == (1, 0)
    assert len(ablation.read_records(config.out_dir)) == len(lines)
    assert [r["all_correct"] for r in resumed["rows"]] == [r["all_correct"] for r in first["rows"]]


def test_resume_refuses_other_settings(shapes_sweep):
    config, _ = shapes_sweep
    changed = _config(config.out_dir, height=48)
    with pytest.raises(ValueError, match=r"sweep.json.*height: 32 -> 48"):
        ablation.run_sweep(changed)


def test_other_prompts_get_clip_scores_and_no_judge(other_sweep, clip_folder):
    config, result = other_sweep
    columns, rows = _read_csv(result["csv"])
    assert columns == ["sampler", "steps", "variant", "cfg_scale", "images", "nonfinite",
                       "diversity", "clip_score", "sec_per_image"]
    assert len(rows) == 3 * len(SCALES)
    scorer = metrics.load_clip_scorer(clip_folder)
    for record in ablation.read_records(config.out_dir):
        assert record["judge"] is None
        want = scorer(ablation._load_images(config.out_dir, record), record["prompt"])
        np.testing.assert_allclose(record["clip_scores"], want, rtol=1e-6)
    for row in result["rows"]:
        assert row["clip_score"] >= 0.0


def test_interval_variants_compile_their_own_program(other_sweep):
    _, result = other_sweep
    # Programs: euler/2 steps without and with the interval; the first was compiled by the
    # shapes sweep on the same Generator, so only the interval program is new.
    assert result["programs"] == 2
    assert result["traces"] == 1


def test_grid_with_prompt_and_variant_axes(other_sweep):
    _, result = other_sweep
    grids = result["grids"]
    assert len(grids) == len(SCALES)                          # one per scale (sampler, steps fixed)
    for entry in grids:
        assert (entry["rows"], entry["cols"]) == (2, 3)
        assert entry["row_labels"] == list(OTHER_PROMPTS)
        assert entry["col_labels"][0] == "cfg"


def test_steps_to_fraction_finds_the_fewest_steps_near_the_longest_runs_accuracy():
    def row(sampler, steps, acc, cfg=5.0):
        return {"sampler": sampler, "steps": steps, "variant": "cfg", "cfg_scale": cfg,
                "all_correct": acc}

    rows = [row("euler", 5, 0.50), row("euler", 10, 0.86), row("euler", 20, 0.90),
            row("euler", 40, 0.90), row("ddim", 5, 0.2), row("ddim", 40, 0.2),
            row("heun", 10, 0.4, cfg=1.0)]
    needed = {r["sampler"]: r for r in ablation.steps_to_fraction(rows)}
    assert set(needed) == {"euler", "ddim"}  # heun has one step count only
    assert needed["euler"]["steps_to_95pct"] == 10 and needed["euler"]["max_steps"] == 40
    assert needed["euler"]["all_correct_at_max"] == 0.90
    assert needed["ddim"]["steps_to_95pct"] == 5


def test_sweep_plans_programs_without_running():
    config = _config("/nonexistent", variants=("cfg", "rescale=0.7", "interval=0.1:0.9",
                                               "rescale=0.7,interval=0.1:0.9"),
                     samplers=("euler", "dpmpp_2m:karras=true"))
    sweep = ablation.Sweep.from_config(config)
    assert len(sweep.cells()) == 2 * 2 * 4 * 2
    assert len(sweep.programs()) == 2 * 2 * 2
    spec = sweep.spec(ablation.Cell("dpmpp_2m:karras=true", 3, "interval=0.1:0.9", 7.5))
    assert (spec.sampler, spec.sampler_options, spec.guidance_interval) == (
        "dpmpp_2m", (("karras", True),), (0.1, 0.9))
    assert all(ablation.is_shapes_prompt(p) for p in sweep.prompts) and len(sweep.prompts) == 2


def test_variant_and_sampler_parsing():
    assert ablation.Variant.parse("cfg") == ablation.Variant("cfg")
    assert ablation.Variant.parse("rescale=0.7,interval=0.25:0.75") == ablation.Variant(
        "rescale=0.7,interval=0.25:0.75", 0.7, (0.25, 0.75))
    assert ablation.Variant.parse("interval=0:1").interval is None
    for bad in ("rescale=2", "interval=0.8:0.2", "scale=3", "interval=0.5"):
        with pytest.raises(ValueError, match="guidance variant"):
            ablation.Variant.parse(bad)
    assert parse_sampler("euler_a") == ("euler_a", ())
    assert parse_sampler("dpmpp_2m:karras=true,order=2") == (
        "dpmpp_2m", (("karras", True), ("order", 2)))
    with pytest.raises(ValueError, match="key=value"):
        parse_sampler("euler:karras")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="config.steps repeats"):
        ablation.Sweep.from_config(_config(tmp_path, steps=(2, 2)))
    with pytest.raises(ValueError, match="grid axis 'colour'"):
        ablation.write_grids(str(tmp_path), ablation.Sweep.from_config(_config(tmp_path)), [],
                             "colour", "sampler")


# --- the ControlNet scale axis ---------------------------------------------------------------------

CONTROL_SCALES = (0.0, 0.5, 1.0)


def _control_config(out_dir, **overrides):
    """One (sampler, steps, variant), so one program, x the guidance scales; one prompt, 2 seeds."""
    return _config(out_dir, samplers=("euler",), steps=(2,), variants=("cfg",), num_prompts=1,
                   **overrides)


@pytest.fixture(scope="module")
def control_files(tmp_path_factory, generator):
    """A ControlNet of the tiny model's U-Net whose zero convs are not zero (so its scale shows in
    the images), saved as a diffusers folder, and a control image."""
    folder = tmp_path_factory.mktemp("control")
    save_controlnet(random_controlnet(generator.model, seed=5), folder / "controlnet")
    blocks = np.random.default_rng(0).random((4, 4, 3))
    Image.fromarray((np.kron(blocks, np.ones((8, 8, 1))) * 255).astype(np.uint8)).save(
        folder / "control.png")
    return {"controlnet": (str(folder / "controlnet"),),
            "control_image": (str(folder / "control.png"),)}


@pytest.fixture(scope="module")
def control_sweeps(tmp_path_factory, generator, control_files):
    """The same sweep without a ControlNet, and with one at CONTROL_SCALES (grid x = control_scale,
    y = cfg_scale)."""
    plain = _control_config(tmp_path_factory.mktemp("plain_sweep"))
    plain_result = ablation.run_sweep(plain, generator=generator)
    controlled = _control_config(tmp_path_factory.mktemp("control_sweep"), **control_files,
                                 control_scales=CONTROL_SCALES,
                                 **{"grid.x": "control_scale", "grid.y": "cfg_scale"})
    result = ablation.run_sweep(controlled, generator=generator)
    return {"plain": plain, "plain_result": plain_result, "config": controlled, "result": result}


def _by_cell(out_dir):
    return {(r["cfg_scale"], r.get("control_scale")): ablation._load_images(out_dir, r)
            for r in ablation.read_records(out_dir)}


def test_control_scales_run_in_as_many_programs_as_without_the_axis(control_sweeps, generator,
                                                                    tmp_path):
    result = control_sweeps["result"]
    assert result["programs"] == control_sweeps["plain_result"]["programs"] == 1
    # Six cells (3 ControlNet scales x 2 guidance scales), one program traced once.
    assert result["traces"] == 1
    assert result["generated"] == len(CONTROL_SCALES) * len(SCALES)
    assert result["columns"][:5] == ["sampler", "steps", "variant", "cfg_scale", "control_scale"]
    assert [(r["cfg_scale"], r["control_scale"]) for r in result["rows"]] == [
        (g, c) for g in SCALES for c in CONTROL_SCALES]
    assert "control_scale" not in control_sweeps["plain_result"]["columns"]
    # A restart with another scale draws only its cells, in the same program.
    config = control_sweeps["config"].copy_and_resolve_references()
    with config.unlocked():
        config.out_dir = str(tmp_path / "more")
        config.control_scales = CONTROL_SCALES + (2.0,)
    shutil.copytree(control_sweeps["config"].out_dir, config.out_dir)
    again = ablation.run_sweep(config, generator=generator)
    assert (again["generated"], again["skipped"], again["traces"]) == (
        len(SCALES), len(CONTROL_SCALES) * len(SCALES), 0)


def test_control_scale_zero_draws_the_images_without_a_controlnet(control_sweeps):
    plain = _by_cell(control_sweeps["plain"].out_dir)
    controlled = _by_cell(control_sweeps["config"].out_dir)
    for cfg_scale in SCALES:
        without = plain[(cfg_scale, None)].astype(int)
        assert np.abs(controlled[(cfg_scale, 0.0)].astype(int) - without).max() <= 1
        for scale in CONTROL_SCALES[1:]:
            assert np.abs(controlled[(cfg_scale, scale)].astype(int) - without).max() > 2
        assert np.abs(controlled[(cfg_scale, 0.5)].astype(int)
                      - controlled[(cfg_scale, 1.0)].astype(int)).max() > 2


def test_control_scale_is_recorded_per_record_and_png(control_sweeps):
    out_dir = control_sweeps["config"].out_dir
    records = ablation.read_records(out_dir)
    assert sorted({r["control_scale"] for r in records}) == list(CONTROL_SCALES)
    assert all("control_scale" not in r
               for r in ablation.read_records(control_sweeps["plain"].out_dir))
    half = next(r for r in records if r["control_scale"] == 0.5)
    assert "-control0.5/" in half["files"][0]                # the cell's own folder
    text = images_lib.read_parameters(os.path.join(out_dir, half["files"][0]))
    assert 'ControlNet 0: "Module: none, Model: controlnet' in text and "Weight: 0.5" in text


def test_grid_with_control_scale_on_x(control_sweeps):
    config, result = control_sweeps["config"], control_sweeps["result"]
    (entry,) = result["grids"]                      # one (sampler, steps, variant, prompt)
    assert (entry["rows"], entry["cols"], entry["tiles"]) == (len(SCALES), len(CONTROL_SCALES), 6)
    assert entry["col_labels"] == ["ControlNet 0", "ControlNet 0.5", "ControlNet 1"]
    assert entry["row_labels"] == ["CFG 1", "CFG 7.5"]
    canvas = np.asarray(Image.open(os.path.join(config.out_dir, entry["file"])))
    by_cell = _by_cell(config.out_dir)
    tiles = [np.concatenate(list(by_cell[(g, c)]), axis=1) for g in SCALES for c in CONTROL_SCALES]
    np.testing.assert_array_equal(canvas, images_lib.grid(
        tiles, rows=len(SCALES), row_labels=entry["row_labels"], col_labels=entry["col_labels"]))


def test_control_settings_errors_are_one_line(tmp_path, control_files, control_sweeps):
    def error(config, call=ablation.Sweep.from_config):
        with pytest.raises(ValueError) as info:
            call(config)
        assert "\n" not in str(info.value)
        return str(info.value)

    without_controlnet = error(_control_config(tmp_path, control_scales=(0.0, 1.0)))
    assert "config.control_scales" in without_controlnet
    assert "config.controlnet," in without_controlnet
    for scales, message in (((0.5, 0.5), "config.control_scales repeats"),
                            ((float("nan"),), "config.control_scales must be finite"),
                            (("strong",), "config.control_scales must hold numbers")):
        assert message in error(_control_config(tmp_path, **control_files, control_scales=scales))
    assert "--control_image: 0 value(s) for 1 ControlNet(s)" in error(_control_config(
        tmp_path, controlnet=control_files["controlnet"], control_scales=(0.0, 1.0)))
    assert "no such file" in error(_control_config(
        tmp_path, **{**control_files, "control_image": (str(tmp_path / "missing.png"),)}))
    assert "--control_guess_mode needs a --controlnet" in error(
        _control_config(tmp_path, control_guess_mode=True))
    # The grid axis without the sweep axis: refused before anything is drawn.
    no_axis = _control_config(tmp_path / "no_axis", **control_files, **{"grid.x": "control_scale"})
    assert "grid axis 'control_scale' needs config.control_scales" in error(
        no_axis, ablation.run_sweep)
    assert not os.path.exists(tmp_path / "no_axis" / ablation.RECORDS)
    # Another start into the sweep's folder would mix images: named, refused.
    changed = control_sweeps["config"].copy_and_resolve_references()
    with changed.unlocked():
        changed.control_start = (0.5,)
    assert "control_start: [] -> [0.5]" in error(changed, ablation.run_sweep)


def test_guess_mode_is_static_and_axis_scales_multiply_the_listed_scale(control_files):
    sweep = ablation.Sweep.from_config(_control_config("/nonexistent", **control_files,
                                                       control_guess_mode=True,
                                                       control_scale=(0.5,),
                                                       control_scales=CONTROL_SCALES))
    assert len(sweep.programs()) == 1
    assert all(spec.guess_mode for spec in sweep.programs())
    assert [(c.control_scale, sweep.controls_for(c)[0].scale) for c in sweep.cells()[:3]] == [
        (0.0, 0.0), (0.5, 0.25), (1.0, 0.5)]


# --- flow models: SD3's skip-layer guidance, Flux.1-dev's distilled guidance, sampler options -----

FLOW_TEXT_TOKENS = 16
SLG_VARIANTS = ("cfg", "slg=1", "slg=1@0:1,slg_scale=5")   # the last two share a program
FLUX_SAMPLERS = ("flow_euler:shift=1.0", "flow_euler:shift=3.0")
DISTILLED = (1.0, 4.0)


def _flow_config(family, out_dir, **overrides):
    """configs/ablate.py:tiny_<family> at 2 steps, one prompt, 2 seeds, short T5 prompts."""
    config = ablate_config.get_config(f"tiny_{family}")
    with config.unlocked():
        config.steps = (2,)
        config.num_prompts, config.num_seeds = 1, 2
        config.max_sequence_length = FLOW_TEXT_TOKENS
        config.out_dir = str(out_dir)
        config.compilation_cache = ""
    return _override(config, overrides)


# Fan-in weights (random_pretrained's choice for the flow families): at N(0, 0.02) a tiny
# transformer is blind to its conditioning
# (guidance moves no pixel by 1/255), which would hide what these sweeps compare.
@pytest.fixture(scope="module")
def sd3_generator():
    return Generator(random_pretrained("tiny_sd3", for_training=True))


@pytest.fixture(scope="module")
def flux_generator():
    return Generator(random_pretrained("tiny_flux", for_training=True))


@pytest.fixture(scope="module")
def sd3_sweep(tmp_path_factory, sd3_generator):
    """flow_euler, 3 steps x CFG (1, 4) x (plain, SLG on block 1, SLG at scale 5), the window
    (0, 1) from the tiny_sd3 config: steps 1 and 2 are inside it."""
    config = _flow_config("sd3", tmp_path_factory.mktemp("sd3_sweep"), samplers=("flow_euler",),
                          steps=(3,), variants=SLG_VARIANTS)
    return config, ablation.run_sweep(config, generator=sd3_generator)


@pytest.fixture(scope="module")
def flux_sweep(tmp_path_factory, flux_generator):
    """Two static shifts x the distilled guidance at DISTILLED, plain sampling (CFG 1)."""
    config = _flow_config("flux", tmp_path_factory.mktemp("flux_sweep"), samplers=FLUX_SAMPLERS,
                          embedded_guidances=DISTILLED,
                          **{"grid.x": "sampler", "grid.y": "embedded_guidance"})
    return config, ablation.run_sweep(config, generator=flux_generator)


def _flow_images(out_dir, key):
    """{(sampler, variant, cfg_scale, distilled guidance): uint8 images} of a sweep."""
    return {tuple(r.get(f) for f in key): ablation._load_images(out_dir, r).astype(int)
            for r in ablation.read_records(out_dir)}


def _png_text(out_dir, record):
    return images_lib.read_parameters(os.path.join(out_dir, record["files"][0]))


@pytest.mark.slow  # flow sweeps compile several programs
def test_sd3_sweep_compiles_one_program_per_static_setting_and_resumes(sd3_sweep, sd3_generator):
    config, result = sd3_sweep
    # Plain CFG, and SLG on block 1 in the window (0, 1) whatever its scale: two programs.
    assert result["programs"] == result["traces"] == 2
    assert result["generated"] == len(SLG_VARIANTS) * 2
    assert [(r["variant"], r["cfg_scale"]) for r in result["rows"]] == [
        (v, g) for v in SLG_VARIANTS for g in (1.0, 4.0)]
    again = ablation.run_sweep(config, generator=sd3_generator)
    assert (again["generated"], again["traces"], again["skipped"]) == (0, 0, len(SLG_VARIANTS) * 2)
    assert again["rows"] == result["rows"]


@pytest.mark.slow  # flow sweeps compile several programs
def test_sd3_skip_layer_guidance_changes_the_images_only_with_cfg(sd3_sweep):
    config, _ = sd3_sweep
    images = _flow_images(config.out_dir, ("variant", "cfg_scale"))
    plain, slg, stronger = SLG_VARIANTS
    assert np.abs(images[(slg, 4.0)] - images[(plain, 4.0)]).max() > 2
    assert np.abs(images[(stronger, 4.0)] - images[(slg, 4.0)]).max() > 2  # the scale is data
    assert np.abs(images[(plain, 4.0)] - images[(plain, 1.0)]).max() > 2
    # At scale 1 there is no guidance to add to: as diffusers and generate.py, no SLG either.
    for variant in (slg, stronger):
        assert np.abs(images[(variant, 1.0)] - images[(plain, 1.0)]).max() <= 1


@pytest.mark.slow  # flow sweeps compile several programs
def test_sd3_pngs_record_skip_layer_guidance_where_it_ran(sd3_sweep):
    config, _ = sd3_sweep
    texts = {(r["variant"], r["cfg_scale"]): _png_text(config.out_dir, r)
             for r in ablation.read_records(config.out_dir)}
    plain, slg, stronger = SLG_VARIANTS
    assert "SLG: layers 1 scale 2.8 from 0.0 to 1.0" in texts[(slg, 4.0)]
    assert "SLG: layers 1 scale 5.0 from 0.0 to 1.0" in texts[(stronger, 4.0)]
    for key in ((plain, 4.0), (slg, 1.0), (stronger, 1.0)):
        assert "SLG" not in texts[key], key
    assert "Sampler: flow_euler, CFG scale: 4.0, Seed: 0" in texts[(slg, 4.0)]
    assert f"T5 tokens: {FLOW_TEXT_TOKENS}" in texts[(slg, 4.0)]
    assert "Distilled CFG Scale" not in texts[(slg, 4.0)]


@pytest.mark.slow  # flow sweeps compile several programs
def test_flux_distilled_guidance_axis_runs_in_the_samplers_programs(flux_sweep):
    _, result = flux_sweep
    # One program per sampler (its static shift) for every distilled guidance scale.
    assert result["programs"] == result["traces"] == len(FLUX_SAMPLERS)
    assert result["generated"] == len(FLUX_SAMPLERS) * len(DISTILLED)
    assert result["columns"][:5] == ["sampler", "steps", "variant", "cfg_scale",
                                     "embedded_guidance"]
    assert [(r["sampler"], r["embedded_guidance"]) for r in result["rows"]] == [
        (s, g) for s in FLUX_SAMPLERS for g in DISTILLED]


@pytest.mark.slow  # flow sweeps compile several programs
def test_flux_distilled_guidance_and_shift_change_the_images_and_are_in_the_pngs(flux_sweep):
    config, _ = flux_sweep
    images = _flow_images(config.out_dir, ("sampler", "embedded_guidance"))
    low, high = DISTILLED
    for sampler in FLUX_SAMPLERS:
        assert np.abs(images[(sampler, low)] - images[(sampler, high)]).max() > 2
    assert np.abs(images[(FLUX_SAMPLERS[0], low)] - images[(FLUX_SAMPLERS[1], low)]).max() > 2
    record = next(r for r in ablation.read_records(config.out_dir)
                  if (r["sampler"], r["embedded_guidance"]) == (FLUX_SAMPLERS[1], high))
    assert "-distilled4/" in record["files"][0]                   # the cell's own folder
    text = _png_text(config.out_dir, record)
    assert "Sampler: flow_euler, CFG scale: 1.0" in text
    assert "Distilled CFG Scale: 4.0" in text and "Sampler options: shift=3.0" in text
    assert "SLG" not in text


@pytest.mark.slow  # flow sweeps compile several programs
def test_flux_grid_tells_samplers_apart_by_their_options(flux_sweep):
    config, result = flux_sweep
    (entry,) = result["grids"]                      # one (steps, variant, cfg_scale, prompt)
    # Whole sampler strings do not fit a 64 px column; what tells them apart does.
    assert entry["col_labels"] == ["shift=1.0", "shift=3.0"]
    assert entry["row_labels"] == ["Distilled CFG 1", "Distilled CFG 4"]
    canvas = np.asarray(Image.open(os.path.join(config.out_dir, entry["file"])))
    images = _flow_images(config.out_dir, ("sampler", "embedded_guidance"))
    tiles = [np.concatenate(list(images[(s, g)]), axis=1).astype(np.uint8)
             for g in DISTILLED for s in FLUX_SAMPLERS]
    np.testing.assert_array_equal(canvas, images_lib.grid(
        tiles, rows=len(DISTILLED), row_labels=entry["row_labels"], col_labels=entry["col_labels"]))


def test_axis_labels_shorten_samplers_to_their_options_only_where_needed():
    assert ablation.axis_labels("sampler", FLUX_SAMPLERS, limit=10) == ["shift=1.0", "shift=3.0"]
    assert ablation.axis_labels("sampler", FLUX_SAMPLERS) == list(FLUX_SAMPLERS)
    assert ablation.axis_labels("sampler", ("flow_euler", "flow_euler:shift=3.0"), limit=10) == [
        "flow_euler", "shift=3.0"]
    # Different samplers keep their names, cut to fit.
    assert ablation.axis_labels("sampler", ("flow_heun:shift=1.0", "flow_euler"), limit=10) == [
        "flow_heun…", "flow_euler"]


def test_skip_layer_variants_parse_into_static_settings_and_data():
    variant = ablation.Variant.parse("slg=7:8:9@0.01:0.4,slg_scale=4")
    assert (variant.slg_layers, variant.slg_window, variant.slg_scale) == ((7, 8, 9), (0.01, 0.4),
                                                                          4.0)
    assert ablation.Variant.parse("rescale=0.5,slg=2").slg_window is None
    for bad in ("slg=a", "slg=1@0.5:0.2", "slg_scale=3", "slg=1:1", "slg=1@0.5", "slg=-1",
                "slg=1,slg_scale=nan"):
        with pytest.raises(ValueError, match="guidance variant"):
            ablation.Variant.parse(bad)
    config = _flow_config("sd3", "/nonexistent", samplers=("flow_euler",),
                          variants=("cfg", "slg=1", "slg=0:1@0.1:0.5,slg_scale=4"),
                          slg_start=0.2, slg_stop=0.6, slg_scale=3.0)
    sweep = ablation.Sweep.from_config(config)
    assert len(sweep.programs()) == 3
    spec = {c.variant: sweep.spec(c) for c in sweep.cells()}
    assert (spec["cfg"].slg_layers, spec["cfg"].slg_start, spec["cfg"].slg_stop) == (
        (), SamplingSpec.slg_start, SamplingSpec.slg_stop)
    assert (spec["slg=1"].slg_layers, spec["slg=1"].slg_start, spec["slg=1"].slg_stop) == (
        (1,), 0.2, 0.6)
    window = spec["slg=0:1@0.1:0.5,slg_scale=4"]
    assert (window.slg_layers, window.slg_start, window.slg_stop) == ((0, 1), 0.1, 0.5)
    assert all(s.max_sequence_length == FLOW_TEXT_TOKENS for s in spec.values())
    scales = {(c.variant, c.cfg_scale): sweep.request(c, "a cat").slg_scale for c in sweep.cells()}
    assert scales == {("cfg", 1.0): 0.0, ("cfg", 4.0): 3.0, ("slg=1", 1.0): 0.0,
                      ("slg=1", 4.0): 3.0, ("slg=0:1@0.1:0.5,slg_scale=4", 1.0): 0.0,
                      ("slg=0:1@0.1:0.5,slg_scale=4", 4.0): 4.0}
    assert {sweep.request(c, "a cat").embedded_guidance for c in sweep.cells()} == {3.5}


def test_flow_sweep_settings_errors_name_the_field(tmp_path):
    def error(**overrides):
        with pytest.raises(ValueError) as info:
            ablation.Sweep.from_config(_flow_config("sd3", tmp_path, **overrides))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "need a config.cfg_scales value other than 1" in error(cfg_scales=(1.0,))
    twice = error(samplers=("flow_euler:shift=3.0", "flow_euler:shift=3"))
    assert "config.samplers: 'flow_euler:shift=3' is 'flow_euler:shift=3.0' written another" in twice
    assert "config.embedded_guidances must hold numbers" in error(embedded_guidances=("high",))
    assert "config.embedded_guidances repeats" in error(embedded_guidances=(2.0, 2.0))


def test_sweeps_a_model_cannot_run_are_refused_before_drawing(tmp_path, sd3_generator,
                                                              flux_generator, generator):
    def error(arch, family="sd3", **overrides):
        sweep = ablation.Sweep.from_config(_flow_config(family, tmp_path, **overrides))
        with pytest.raises(ValueError) as info:
            sweep.check_model(arch)
        assert "\n" not in str(info.value)
        return str(info.value)

    sd3 = sd3_generator.arch
    assert "this sd3 model has no guidance embedding" in error(sd3, embedded_guidances=(1.0, 2.0))
    assert "its samplers are: flow_dpmpp_2m" in error(sd3, samplers=("euler",))
    assert "variant 'slg=5'" in error(sd3, variants=("slg=5",))
    assert "(0..1)" in error(sd3, variants=("slg=5",))
    assert "needs an SD3 model" in error(flux_generator.arch, "flux", cfg_scales=(1.0, 2.0),
                                         variants=("slg=1",))
    assert "its samplers are: ddim" in error(generator.arch)    # the tiny U-Net, flow samplers
    # Through run_sweep: refused before the first program is drawn.
    config = _flow_config("sd3", tmp_path / "refused", embedded_guidances=(1.0, 2.0))
    with pytest.raises(ValueError, match="no guidance embedding"):
        ablation.run_sweep(config, generator=sd3_generator)
    assert ablation.read_records(config.out_dir) == []


def test_tiny_flow_configs_plan_what_their_models_run(sd3_generator, flux_generator):
    sd3 = ablation.Sweep.from_config(ablate_config.get_config("tiny_sd3"))
    assert len(sd3.programs()) == 4             # 2 samplers x (plain, SLG on block 1)
    sd3.check_model(sd3_generator.arch)
    flux = ablation.Sweep.from_config(ablate_config.get_config("tiny_flux"))
    assert len(flux.programs()) == 2            # the two shifts; the distilled guidance is data
    assert flux.optional_axes == ("embedded_guidance",)
    flux.check_model(flux_generator.arch)
