"""SD3 / SD3.5 and Flux.1 through the entry points: `experiments.generate` with configs/sd35.py:tiny
and flux_dev.py:tiny writes PNGs whose `parameters` hold skip-layer guidance, the distilled
guidance, the sampler and its options; `experiments.sample` resumes a JSONL run on tiny SD3 to the
same files; the exported-program cache serves flow programs; bad input is one line that names the
fix."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import sd35
from sdjax import images as images_lib
from sdjax.sampling import Generator, Request, SamplingSpec
from sdjax.sampling import batches as bs
from sdjax.weights.presets import random_pretrained
from tests.helpers import run_python

SIZE, STEPS, TOKENS = 32, 2, 16
# Every CLI run: tiny sizes, two steps, short T5 prompts, no bar.
COMMON = (f"--config.height={SIZE}", f"--config.width={SIZE}", f"--config.steps={STEPS}",
          f"--config.max_sequence_length={TOKENS}", "--config.progress=false")
# SD3's skip-layer guidance on block 1 of the tiny MMDiT's 2, in every step but the first.
SLG = ("--config.slg_layers=(1,)", "--config.slg_start=0.0", "--config.slg_stop=1.0")


def _generate(config: str, out_dir, *args):
    return run_python("-m", "experiments.generate", f"--config={config}", *COMMON,
                      "--config.compilation_cache=", f"--out_dir={out_dir}", *args)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _error_line(result, program: str = "generate.py") -> str:
    """The one `error:` line of a failed run (a traceback or a second line fails the test)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# --- experiments.generate -------------------------------------------------------------------------

@pytest.mark.slow  # compiles sampling programs
def test_sd35_generate_writes_skip_layer_guidance_and_sampler_options_into_the_pngs(tmp_path):
    result = _generate("configs/sd35.py:tiny", tmp_path, "--prompt=a red circle", "--num_images=2",
                       "--seed=3", "--config.sampler=flow_euler:shift=2.0",
                       "--config.slg_scale=3.0", *SLG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p for p in os.listdir(tmp_path) if p[0].isdigit()) == ["00000-3.png",
                                                                         "00001-4.png"]
    text = images_lib.read_parameters(tmp_path / "00001-4.png")
    assert text.startswith("a red circle\nSteps: 2, Sampler: flow_euler, CFG scale: 3.5, Seed: 4, "
                           "Size: 32x32, Model: random:tiny_sd3, ")
    assert "SLG: layers 1 scale 3.0 from 0.0 to 1.0" in text
    assert f"T5 tokens: {TOKENS}" in text and "Sampler options: shift=2.0" in text
    assert "Distilled CFG Scale" not in text
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["slg_layers"], config["sampler"]) == ([1], "flow_euler:shift=2.0")


@pytest.mark.slow  # compiles sampling programs
def test_sd35_without_guidance_records_no_skip_layer_guidance(tmp_path):
    # CFG 1 runs no guidance, and skip-layer guidance acts only with it (as in diffusers).
    result = _generate("configs/sd35.py:tiny", tmp_path, "--prompt=a red circle", "--cfg_scale=1",
                       *SLG)
    assert result.returncode == 0, result.stderr[-3000:]
    text = images_lib.read_parameters(tmp_path / "00000-0.png")
    assert "CFG scale: 1.0" in text and "SLG" not in text


@pytest.mark.slow  # compiles sampling programs
def test_flux_dev_generate_writes_the_distilled_guidance_into_the_pngs(tmp_path):
    result = _generate("configs/flux_dev.py:tiny", tmp_path, "--prompt=a red circle",
                       "--embedded_guidance=5")
    assert result.returncode == 0, result.stderr[-3000:]
    text = images_lib.read_parameters(tmp_path / "00000-0.png")
    assert ("Steps: 2, Sampler: flow_euler, CFG scale: 1.0, Seed: 0, Size: 32x32, "
            "Model: random:tiny_flux, Distilled CFG Scale: 5.0") in text
    assert "SLG" not in text


# --- experiments.sample: a JSONL run on tiny SD3, resumed -----------------------------------------

PROMPTS = [{"prompt": "a red circle"}, {"prompt": "a blue square", "seed": 100},
           {"prompt": "a green ring", "num_images": 1}]
TOTAL = 2 + 2 + 1


def _sample(root, out_dir, *args):
    return run_python("-m", "experiments.sample", "--config=configs/sd35.py:tiny", *COMMON, *SLG,
                      "--config.sampler=flow_euler:shift=2.0", f"--prompts={root / 'p.jsonl'}",
                      "--images_per_prompt=2", f"--out_dir={out_dir}",
                      f"--config.compilation_cache={root / 'xla'}", *args)


def _counts(result) -> tuple[int, int, int]:
    """(written, already there, program traces) from the run's log."""
    assert result.returncode == 0, result.stderr[-3000:]
    done = [line for line in result.stderr.splitlines() if "already there" in line][-1]
    words = done.split("]")[-1].split()
    traces = [line for line in result.stderr.splitlines() if "program trace(s)" in line][-1]
    return int(words[0]), int(words[2]), int(traces.split("images/s), ")[1].split()[0])


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A fresh run, then the same command again into its folder."""
    root = tmp_path_factory.mktemp("flow_sample")
    (root / "p.jsonl").write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    fresh = _sample(root, root / "run")
    again = _sample(root, root / "run")
    return root, fresh, again


@pytest.mark.slow  # compiles sampling programs
def test_sample_draws_every_prompt_with_its_flow_parameters(sampled):
    root, fresh, _ = sampled
    assert _counts(fresh)[:2] == (TOTAL, 0)
    files = sorted(str(p.relative_to(root / "run")) for p in (root / "run").glob("*/*.png"))
    assert files == ["00000/0000-0.png", "00000/0001-1.png", "00001/0000-100.png",
                     "00001/0001-101.png", "00002/0000-4.png"]
    text = images_lib.read_parameters(root / "run" / "00001" / "0001-101.png")
    assert text.startswith("a blue square\nSteps: 2, Sampler: flow_euler, CFG scale: 3.5, "
                           "Seed: 101")
    assert "SLG: layers 1 scale 2.8 from 0.0 to 1.0" in text
    assert "Sampler options: shift=2.0" in text


@pytest.mark.slow  # compiles sampling programs
def test_sample_run_again_draws_nothing_and_an_interrupted_one_redraws_the_same_pixels(sampled,
                                                                                       tmp_path):
    root, _, again = sampled
    assert _counts(again) == (0, TOTAL, 0)
    # As if killed before its last two images: files and manifest lines gone.
    out = tmp_path / "interrupted"
    shutil.copytree(root / "run", out)
    lost = ["00001/0001-101.png", "00002/0000-4.png"]
    for name in lost:
        (out / name).unlink()
    manifest = out / bs.MANIFEST
    lines = [line for line in manifest.read_text().splitlines()
             if json.loads(line)["path"] not in lost]
    manifest.write_text("\n".join(lines) + "\n")
    written, kept, traces = _counts(_sample(root, out))
    # Drawn again by the program the first run exported: nothing traced.
    assert (written, kept, traces) == (len(lost), TOTAL - len(lost), 0)
    for name in lost:
        np.testing.assert_array_equal(_pixels(out / name), _pixels(root / "run" / name))
        assert images_lib.read_parameters(out / name) == images_lib.read_parameters(
            root / "run" / name)
    assert sorted(e["path"] for e in bs.read_manifest(out)) == sorted(
        e["path"] for e in bs.read_manifest(root / "run"))


def test_resuming_with_other_flow_settings_is_refused(tmp_path):
    config = sd35.get_config("tiny")
    bs._check_and_write_config(config, str(tmp_path))
    for field, value, change in (("slg_scale", 4.0, "slg_scale: 2.8 -> 4.0"),
                                 ("slg_layers", (1,), "slg_layers: [] -> [1]"),
                                 ("embedded_guidance", 2.0, "embedded_guidance: 3.5 -> 2.0"),
                                 ("max_sequence_length", 77, "max_sequence_length: 0 -> 77")):
        other = sd35.get_config("tiny")
        other[field] = value
        with pytest.raises(ValueError, match=rf"config.json: .*\({re.escape(change)}\)"):
            bs._check_and_write_config(other, str(tmp_path))


def test_prompt_file_samplers_take_their_options_over_the_configs(tmp_path):
    config = sd35.get_config("tiny")
    config.sampler = "flow_euler:shift=2.0"
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "sampler": "flow_heun:shift=4.0"}\n'
                    '{"prompt": "c", "sampler": "flow_heun"}\n'
                    '{"prompt": "d", "sampler": "nope:x=1"}\n')
    with pytest.raises(bs.PromptFileError, match=r"p.jsonl:4: unknown sampler 'nope'"):
        bs.read_prompts(path, config)
    path.write_text("\n".join(path.read_text().splitlines()[:3]))
    base = SamplingSpec(sampler="flow_euler", sampler_options=(("shift", 2.0),))
    specs = [bs.spec_for(base, p) for p in bs.read_prompts(path, config)]
    assert [(s.sampler, s.sampler_options) for s in specs] == [
        ("flow_euler", (("shift", 2.0),)), ("flow_heun", (("shift", 4.0),)),
        ("flow_heun", (("shift", 2.0),))]


# --- exported programs ----------------------------------------------------------------------------

@pytest.mark.slow  # compiles sampling programs
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_exported_cache_serves_flow_programs_without_tracing(tmp_path, family):
    model = random_pretrained(f"tiny_{family}")
    if family == "sd3":  # with CFG and skip-layer guidance (a lax.cond in the scan)
        spec = SamplingSpec(sampler="flow_euler", steps=STEPS, height=SIZE, width=SIZE,
                            max_sequence_length=TOKENS, slg_layers=(1,), slg_start=0.0,
                            slg_stop=1.0)
        request = Request(prompt="a red circle", num_images=2, seed=5, cfg_scale=4.0)
        other = dict(slg_scale=5.0, cfg_scale=6.0)
    else:  # Flux.1-dev: the distilled guidance as data, no CFG
        spec = SamplingSpec(sampler="flow_euler", sampler_options=(("shift", 3.0),), steps=STEPS,
                            height=SIZE, width=SIZE, max_sequence_length=TOKENS, guidance=False)
        request = Request(prompt="a red circle", num_images=2, seed=5, cfg_scale=1.0,
                          embedded_guidance=5.0)
        other = dict(embedded_guidance=2.0)
    first = Generator(model, exported_programs=str(tmp_path))
    drawn = first(request, spec)["images"]
    assert first.program_log[-1]["outcome"] == "miss" and first.traces == 1
    (sidecar,) = tmp_path.glob("*.json")
    description = json.loads(sidecar.read_text())["description"]
    assert description["architecture"]["family"] == family
    assert description["spec"]["slg_layers"] == list(spec.slg_layers)

    second = Generator(model, exported_programs=str(tmp_path))
    loaded = second(request, spec)["images"]
    assert second.program_log[-1]["outcome"] == "hit" and second.traces == 0
    np.testing.assert_array_equal(loaded, drawn)
    # The guidance scales are data of the loaded program too.
    second(dataclasses.replace(request, **other), spec)
    assert second.traces == 0 and len(second.program_log) == 1


# --- one-line errors ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    """The tiny Flux transformer alone in BFL's layout, as Flux.1 files ship."""
    from tests import flow_models
    from tests.single_file_writer import flux_to_original, to_numpy, write_single_file

    parts, _, _ = flow_models.build_parts("flux")
    path = tmp_path_factory.mktemp("flux_file") / "flux1-tiny.safetensors"
    write_single_file(path, flux_to_original(to_numpy(parts["transformer"].state_dict())))
    return path


@pytest.mark.parametrize("config, args, message", [
    ("configs/sd35.py:tiny", ["--config.sampler=euler"],
     "sampler 'euler' does not fit this sd3 model (flow-matching); its samplers are: "
     "flow_dpmpp_2m, flow_dpmpp_2m_sde, flow_euler, flow_euler_a, flow_heun, flow_unipc"),
    ("configs/sd35.py:tiny", ["--config.slg_layers=(99,)"],
     "slg_layers [99] are not joint blocks of this transformer (0..1)"),
    # (each case is a process of its own: the rest run with the slow tests)
    pytest.param("configs/flux_dev.py:tiny", ["--config.slg_layers=(1,)"],
                 "slg_layers (skip-layer guidance) needs an SD3 model, this one is flux",
                 marks=pytest.mark.slow),
    pytest.param("configs/sd15.py", ["--model=random:tiny", "--config.sampler=flow_euler"],
                 "sampler 'flow_euler' does not fit this sd1 model (noise-prediction); its "
                 "samplers are: ddim", marks=pytest.mark.slow),
    pytest.param("configs/sd35.py:tiny", ["--config.sampler=flow_euler:karras=true"],
                 "sampler 'flow_euler' has no option(s) ['karras']; valid: ['shift']",
                 marks=pytest.mark.slow),
])
def test_bad_flow_input_is_one_line_naming_the_fix(tmp_path, config, args, message):
    line = _error_line(_generate(config, tmp_path, "--prompt=x", *args))
    assert message in line
    assert not list(tmp_path.glob("*.png"))


def test_a_flux_file_without_components_says_to_pass_components(tmp_path, flux_file):
    line = _error_line(_generate("configs/flux_dev.py:tiny", tmp_path, "--prompt=x",
                                 f"--model={flux_file}"))
    assert f"{flux_file}: the file holds no vae, text_encoder, text_encoder_2: pass " \
           f"components= (--components) a diffusers flux folder" in line
