"""ControlNets from the command line and prompt files: `experiments/generate.py --controlnet ...`
end to end on a tiny SD 1.x folder and tiny diffusers ControlNets (PNG written, the WebUI's
`ControlNet 0` metadata, another image than without), one-line errors before any model loads, and
`sdjax.sampling.batches` grouping lines by ControlNet, not by control image or scale (one program
trace), with the control settings and files in the resume checks."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from configs import sd15
from sdjax import images as images_lib
from sdjax.sampling import batches as bs
from sdjax.sampling import generate
from tests.helpers import REPO_ROOT, run_python

SIZE, STEPS, SEED, PROMPT = 32, 2, 1, "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD 1.x diffusers folder, two ControlNets made from its U-Net (random weights: one
    from_unet would add nothing) in a ControlNet folder, and a control image of another size."""
    import diffusers

    from benchmarks.checkpoints import save_diffusers_folder
    from tests.test_sampling import SD_SCHEDULER, randomise, sd1_parts

    root = tmp_path_factory.mktemp("controlnet_cli")
    parts = sd1_parts()
    out = {"root": root, "model": save_diffusers_folder(parts, root / "sd1", scheduler=SD_SCHEDULER),
           "controlnets": root / "controlnets"}
    for name, seed in (("cn_a", 31), ("cn_b", 32)):
        # The conditioning embedding downsamples as much as the tiny VAE (2x): two widths.
        randomise(diffusers.ControlNetModel.from_unet(
            parts["unet"], conditioning_embedding_out_channels=(8, 16)), seed).save_pretrained(
                out["controlnets"] / name)
    image = Image.new("RGB", (48, 40), (20, 40, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 30, 34), fill=(230, 30, 30))
    draw.rectangle((30, 4, 44, 20), fill=(250, 250, 250))
    out["image"] = root / "control.png"
    image.save(out["image"])
    return out


@pytest.fixture(scope="module")
def model(folders):
    import sdjax

    return sdjax.load_pretrained(folders["model"])


def _run(folders, *args, out_dir):
    return run_python("-m", "experiments.generate", "--config=configs/sd15.py",
                      f"--model={folders['model']}", f"--height={SIZE}", f"--width={SIZE}",
                      f"--config.steps={STEPS}", "--config.sampler=euler", "--config.progress=false",
                      "--config.compilation_cache=", f"--prompt={PROMPT}", f"--seed={SEED}",
                      f"--out_dir={out_dir}", *args)


def _relative(path) -> str:
    """`path` relative to the folder the CLI runs in (run_python's working directory)."""
    return os.path.relpath(path, REPO_ROOT)


@pytest.fixture(scope="module")
def cli_images(folders):
    """One image drawn by the CLI with a ControlNet named in --controlnet_dir (both given as paths
    relative to the working directory, as is the control image), one without."""
    root = folders["root"]
    controlled = _run(folders, "--controlnet=cn_a",
                      f"--controlnet_dir={_relative(folders['controlnets'])}",
                      f"--control_image={_relative(folders['image'])}", "--control_scale=0.5",
                      "--control_preprocess=canny", out_dir=root / "cli_controlled")
    assert controlled.returncode == 0, controlled.stderr[-3000:]
    plain = _run(folders, out_dir=root / "cli_plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    name = f"00000-{SEED}.png"
    return {"controlled": root / "cli_controlled" / name, "plain": root / "cli_plain" / name}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int32)


def _webui_hash(folder) -> str:
    """The WebUI's `sd_models.model_hash` of a ControlNet folder's weights (files over 1 MiB: the
    tiny ones are 1.6 MB, so the hash sees their bytes)."""
    with open(folder / "diffusion_pytorch_model.safetensors", "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# --- the generate CLI -------------------------------------------------------------------------------

def test_generate_draws_with_the_controlnet_and_records_it_as_the_webui_does(folders, cli_images):
    text = images_lib.read_parameters(cli_images["controlled"])
    model = f"cn_a [{_webui_hash(folders['controlnets'] / 'cn_a')}]"
    assert text.endswith(
        f'ControlNet 0: "Module: canny, Model: {model}, Weight: 0.5, Resize Mode: Just Resize, '
        f'Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, '
        f'Control Mode: Balanced"'), text
    assert "ControlNet" not in images_lib.read_parameters(cli_images["plain"])
    difference = np.abs(_pixels(cli_images["controlled"]) - _pixels(cli_images["plain"]))
    assert difference.max() > 8, "the ControlNet changed nothing"
    config = json.loads((cli_images["controlled"].parent / "config.json").read_text())
    assert (config["controlnet"], config["control_scale"], config["control_preprocess"]) == (
        ["cn_a"], [0.5], ["canny"])


@pytest.mark.parametrize("args, message", [
    (["--controlnet=cn_a", "--control_image=/nonexistent/edges.png"],
     "--control_image: /nonexistent/edges.png: no such file"),
    (["--controlnet=cn_a", "--controlnet=cn_b", "--control_image={image}"],
     "--control_image: 1 value(s) for 2 ControlNet(s) (--controlnet); give one per ControlNet"),
    (["--controlnet=cn_a", "--control_image={image}", "--control_scale=1", "--control_scale=2"],
     "--control_scale: 2 value(s) for 1 ControlNet(s) (--controlnet)"),
    (["--controlnet=cn_a", "--control_image={image}", "--control_preprocess=sobel"],
     "flag --control_preprocess=sobel: value should be one of <none|mask|canny>"),
    (["--controlnet=cn_a", "--control_image={image}", "--control_start=0.6", "--control_end=0.4"],
     "--control_start 0.6 and --control_end 0.4 (ControlNet 0) must satisfy 0 <= start < end <= 1"),
    (["--controlnet=nowhere", "--control_image={image}"],
     "ControlNet 'nowhere': no such file or folder (nor in --controlnet_dir"),
    (["--control_guess_mode"], "--control_guess_mode needs a --controlnet"),
])
def test_bad_control_settings_are_one_line_errors_before_any_model_loads(folders, tmp_path, args,
                                                                         message):
    # A model that does not exist: had the settings been checked after loading, its error would show.
    result = run_python("-m", "experiments.generate", "--model=/nonexistent/model", "--prompt=x",
                        "--height=32", "--width=32", "--config.compilation_cache=",
                        f"--controlnet_dir={folders['controlnets']}", f"--out_dir={tmp_path}",
                        *(a.format(image=folders["image"]) for a in args))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "/nonexistent/model" not in result.stderr


# --- settings ---------------------------------------------------------------------------------------

def test_start_end_and_preprocess_take_one_for_all_and_scales_default_to_one(folders):
    image = str(folders["image"])
    controls = generate.controls_from(
        {"controlnet": ["cn_a", "cn_b"], "control_image": [image, image], "control_start": [0.2],
         "control_end": (0.5, 0.9), "control_preprocess": "mask"},
        directory=str(folders["controlnets"]))
    assert [(c.scale, c.start, c.end, c.preprocess) for c in controls] == [
        (1.0, 0.2, 0.5, "mask"), (1.0, 0.2, 0.9, "mask")]
    assert [c.controlnet for c in controls] == [str(folders["controlnets"] / n)
                                                for n in ("cn_a", "cn_b")]
    assert generate.controls_from({}) == ()


def test_relative_controlnet_paths_resolve_against_the_working_directory(folders, monkeypatch):
    monkeypatch.chdir(folders["root"])
    (control,) = generate.controls_from({"controlnet": "controlnets/cn_b",
                                         "control_image": "control.png"})
    assert control.controlnet == str(folders["controlnets"] / "cn_b")
    assert control.image == "control.png"


# --- prompt files -------------------------------------------------------------------------------------

def _config(folders, **overrides):
    config = sd15.get_config()
    config.model, config.height, config.width = str(folders["model"]), SIZE, SIZE
    config.steps, config.sampler, config.num_images = STEPS, "euler", 1
    config.compilation_cache, config.progress, config.batch_size = "", False, 2
    config.controlnet, config.control_image = ("cn_a",), (str(folders["image"]),)
    config.control_preprocess, config.controlnet_dir = ("canny",), str(folders["controlnets"])
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


LINES = [
    {"prompt": PROMPT, "seed": SEED, "control_scale": 0.5},  # the CLI run's settings
    {"prompt": PROMPT, "seed": SEED, "control_scale": 1.5},
    {"prompt": PROMPT, "seed": SEED, "controlnet": "cn_b"},
]


def _write_lines(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def sampled(folders, model, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_prompts")
    prompts = _write_lines(root / "p.jsonl", LINES)
    config = _config(folders, out_dir=str(root / "out"))
    sampler = bs.BatchSampler(config, bs.read_prompts(prompts, config), model=model)
    # Traced here, not loaded from an exported program another test may have left in a cache.
    sampler.generator.exported_programs = False
    stats = sampler.run(config.out_dir, progress=False)
    return {"sampler": sampler, "stats": stats, "config": config, "prompts": prompts,
            "out": root / "out"}


def test_lines_differing_in_scale_share_a_batch_and_one_trace_serves_both_controlnets(sampled):
    sampler = sampled["sampler"]
    assert sampled["stats"]["written"] == 3
    assert [[job.prompt_index for job in batch.jobs] for batch in sampler.batches] == [[0, 1], [2]]
    # cn_b has cn_a's config: its batch runs the same program with its own params.
    assert sampler.generator.traces == 1
    out = sampled["out"]
    scale_05, scale_15, other = (_pixels(out / f"{p:05d}" / f"0000-{SEED}.png") for p in range(3))
    assert np.abs(scale_05 - scale_15).max() > 8, "the scale (data) changed nothing"
    assert np.abs(scale_15 - other).max() > 8, "the second ControlNet was not the one drawn"


def test_a_prompt_file_line_draws_what_the_cli_draws_with_the_same_settings(sampled, cli_images):
    line = sampled["out"] / "00000" / f"0000-{SEED}.png"
    np.testing.assert_array_equal(_pixels(line), _pixels(cli_images["controlled"]))
    assert images_lib.read_parameters(line) == images_lib.read_parameters(cli_images["controlled"])


def test_manifest_records_each_controlnet_with_its_files_and_image(sampled, folders):
    records = {r["prompt_index"]: r for r in bs.read_manifest(sampled["out"])}
    first = records[0]["controls"]
    assert len(first) == 1
    assert {k: first[0][k] for k in ("controlnet", "image", "scale", "start", "end", "preprocess")
            } == {"controlnet": "cn_a", "image": str(folders["image"]), "scale": 0.5,
                  "start": 0.0, "end": 1.0, "preprocess": "canny"}
    assert records[2]["controls"][0]["controlnet"] == "cn_b"
    assert records[2]["controls"][0]["hash"] != first[0]["hash"]
    other = _webui_hash(folders["controlnets"] / "cn_b")
    assert other != _webui_hash(folders["controlnets"] / "cn_a")
    assert f'Model: cn_b [{other}], Weight: 1.0' in images_lib.read_parameters(
        sampled["out"] / records[2]["path"])


def test_resuming_keeps_images_until_a_scale_or_the_control_image_changes(sampled, folders, model,
                                                                         tmp_path):
    config, out = sampled["config"], str(sampled["out"])
    again = bs.sample_to_dir(config, sampled["prompts"], model=model)
    assert (again["written"], again["skipped"]) == (0, 3)
    changed = _write_lines(tmp_path / "p.jsonl", [dict(LINES[0], control_scale=0.7)] + LINES[1:])
    with pytest.raises(ValueError, match=r"drawn from other prompt-file lines.*00000.*controls"):
        bs.sample_to_dir(config, changed, out, model=model)
    moved = tmp_path / "moved.png"
    moved.write_bytes(folders["image"].read_bytes())
    elsewhere = _write_lines(tmp_path / "q.jsonl", [dict(line, control_image=str(moved))
                                                    for line in LINES])
    with pytest.raises(ValueError, match=r"drawn from other prompt-file lines.*controls"):
        bs.sample_to_dir(config, elsewhere, out, model=model)
    # The same path, other contents: a redrawn control image is another image.
    original = folders["image"].read_bytes()
    try:
        Image.open(moved).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folders["image"])
        with pytest.raises(ValueError, match=r"drawn from other prompt-file lines.*controls"):
            bs.sample_to_dir(config, sampled["prompts"], model=model)
    finally:
        folders["image"].write_bytes(original)
    assert bs.sample_to_dir(config, sampled["prompts"], model=model)["skipped"] == 3
    # Images the manifest lost are checked by their PNG parameters, which name the ControlNets.
    os.remove(os.path.join(out, bs.MANIFEST))
    with pytest.raises(ValueError, match=r"00000/0000-1.png: its PNG parameters are not what"):
        bs.sample_to_dir(config, changed, out, model=model)
    assert bs.sample_to_dir(config, sampled["prompts"], model=model)["skipped"] == 3
    assert len(bs.read_manifest(out)) == 3  # the lost lines written again


@pytest.mark.parametrize("line, message", [
    ({"controlnet": ["cn_a", "cn_b"]},
     "p.jsonl:1: field 'control_image': 1 value(s) for 2 ControlNet(s) (field 'controlnet')"),
    ({"control_preprocess": "sobel"},
     "p.jsonl:1: field 'control_preprocess': unknown preprocess 'sobel'"),
    ({"control_scale": "high"}, "p.jsonl:1: field 'control_scale' must be a number or a list"),
    ({"control_start": 1.0}, "p.jsonl:1: field 'control_start' 1.0 and field 'control_end' 1.0"),
    ({"control_image": "/nonexistent/c.png"},
     "p.jsonl:1: field 'control_image': /nonexistent/c.png: no such file"),
    ({"controlnet": "cn_c"}, "p.jsonl:1: ControlNet 'cn_c': no such file or folder"),
    ({"controlnet": ""}, "p.jsonl:1: field 'controlnet': an empty name"),
    ({"controlnet": [], "control_image": "x.png"},
     "p.jsonl:1: field 'control_image': 1 value(s) for 0 ControlNet(s)"),
])
def test_bad_control_fields_of_a_line_are_named(folders, tmp_path, line, message):
    path = _write_lines(tmp_path / "p.jsonl", [dict(prompt="x", **line)])
    with pytest.raises(bs.PromptFileError) as err:
        bs.read_prompts(path, _config(folders))
    assert message in str(err.value)


def test_a_lines_relative_control_image_is_also_found_beside_the_prompt_file(folders, tmp_path,
                                                                             monkeypatch):
    import shutil

    (tmp_path / "prompts" / "masks").mkdir(parents=True)
    shutil.copy(folders["image"], tmp_path / "prompts" / "masks" / "m.png")
    path = _write_lines(tmp_path / "prompts" / "p.jsonl", [dict(prompt="x", control_image="masks/m.png")])
    monkeypatch.chdir(tmp_path)  # the working directory holds no masks/m.png
    (prompt,) = bs.read_prompts(path, _config(folders))
    assert prompt.controls[0].image == str(tmp_path / "prompts" / "masks" / "m.png")


def test_a_line_naming_no_controlnets_draws_without_the_configs(folders, tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [{"prompt": "x", "controlnet": []}, {"prompt": "y"}])
    without, default = bs.read_prompts(path, _config(folders))
    assert without.controls == ()
    assert [c.controlnet for c in default.controls] == [str(folders["controlnets"] / "cn_a")]


def test_png_parameters_record_guess_mode_and_leave_out_the_hash_of_sharded_weights(tmp_path,
                                                                                   folders):
    from sdjax.sampling.controls import Control

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
                 "diffusion_pytorch_model-00002-of-00002.safetensors"):
        (sharded / name).write_bytes(b"{}")
    single = tmp_path / "depth, v2: sd15.safetensors"
    single.write_bytes(bytes(range(256)) * 5000)  # over 1 MiB: the WebUI hash reads 64 KiB of it
    webui = hashlib.sha256(single.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    controls = [Control(str(sharded), "a.png", scale=0.25, start=0.1, end=0.8, preprocess="mask"),
                Control(str(single), "b.png")]
    settings = generate.control_parameters(controls, guess_mode=True)
    assert settings == {
        "ControlNet 0": '"Module: mask, Model: sharded, Weight: 0.25, Resize Mode: Just Resize, '
                        'Guidance Start: 0.1, Guidance End: 0.8, '
                        'Control Mode: ControlNet is more important"',
        # The extension splits units at ',' and ': ': names lose both characters.
        "ControlNet 1": f'"Module: none, Model: depth v2 sd15 [{webui}], Weight: 1.0, Resize Mode: '
                        f'Just Resize, Guidance Start: 0.0, Guidance End: 1.0, '
                        f'Control Mode: ControlNet is more important"'}
    config = _config(folders, control_guess_mode=True)
    assert generate.spec_from_config(config).guess_mode
    assert not generate.spec_from_config(_config(folders)).guess_mode


def test_other_control_settings_in_the_config_refuse_to_resume_into_the_folder(folders, tmp_path):
    bs._check_and_write_config(_config(folders, control_scale=(0.5,)), str(tmp_path))
    with pytest.raises(ValueError, match=r"control_scale: \[0.5\] -> \[0.8\]"):
        bs._check_and_write_config(_config(folders, control_scale=(0.8,)), str(tmp_path))
    with pytest.raises(ValueError, match=r"controlnet: \['cn_a'\] -> \['cn_b'\]"):
        bs._check_and_write_config(_config(folders, control_scale=(0.5,), controlnet=("cn_b",)),
                                   str(tmp_path))
