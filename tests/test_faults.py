"""Bad input and faults: each is answered by one line that names the culprit, before any work
starts, and nothing written earlier is lost or changed."""
import math
import re
import os

import numpy as np
import pytest

from configs import shapes as shapes_config
from sdjax.sampling import generate
from sdjax.sampling.requests import Request, prepare_batch
from sdjax.sampling.spec import SamplingSpec
from sdjax.weights.architecture import Architecture
from tests.helpers import run_python


def _config(**overrides):
    config = shapes_config.get_config()
    with config.unlocked():
        config.model = "random:tiny"
        config.steps = 1
        for key, value in overrides.items():
            setattr(config, key, value)
    return config


# --- generation settings, checked before a model is loaded -----------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": -1}, "batch_size must be an integer >= 0 (0: all images in one call), got -1"),
    ({"num_images": 0}, "num_images must be an integer >= 1, got 0"),
    ({"seed": -1}, "seed -1 with 1 image(s) needs seeds -1..-1, outside 0..4294967295"),
    ({"seed": 2 ** 32 - 1, "num_images": 2},
     "seed 4294967295 with 2 image(s) needs seeds 4294967295..4294967296, outside 0..4294967295"),
    ({"subseed": 2 ** 32, "subseed_strength": 0.5}, "subseed 4294967296 with 1 image(s)"),
    ({"cfg_scale": math.nan}, "cfg_scale must be finite, got nan"),
    ({"dtype": "float8"}, "dtype 'float8' is not one of float32, bfloat16, float16"),
])
def test_generation_settings_are_checked_before_any_work(overrides, message, tmp_path):
    config = _config(out_dir=str(tmp_path / "out"), prompt="x", **overrides)
    with pytest.raises(ValueError) as error:
        generate.generate_to_dir(config, model=_NoModel())
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


class _NoModel:
    """Stands in for a model: a check that comes too late touches it and fails differently."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the settings were checked")


@pytest.fixture(scope="module")
def tiny_arch(tiny_model):
    return Architecture.of(tiny_model), tiny_model.tokenizers


@pytest.mark.parametrize("request_fields, message", [
    ({"cfg_scale": [7.0, math.nan]}, "cfg_scale must be finite"),
    ({"guidance_rescale": math.inf}, "guidance_rescale must be finite"),
    ({"seed": 2 ** 32}, "seed 4294967296 with 2 image(s)"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"subseed": -3, "subseed_strength": 0.3}, "subseed -3 with 2 image(s)"),
    ({"subseed_strength": 2.0}, "subseed_strength must be in [0, 1], got 2.0"),
    ({"num_images": True}, "num_images must be an integer >= 1, got True"),
    ({"prompt": ["a", "b", "c"]}, "prompt has 3 entries but num_images is 2"),
])
def test_bad_requests_are_refused_before_sampling(tiny_arch, request_fields, message):
    arch, tokenizers = tiny_arch
    fields = {"prompt": "a red circle", "num_images": 2, **request_fields}
    with pytest.raises(ValueError) as error:
        prepare_batch(arch, tokenizers, Request(**fields), SamplingSpec(steps=1, height=32, width=32))
    assert message in str(error.value)


# --- outputs are never overwritten ------------------------------------------------------------------

def test_a_second_run_into_the_same_folder_continues_the_numbering(tmp_path, tiny_model):
    out = str(tmp_path)
    first = generate.generate_to_dir(_config(out_dir=out, prompt="a red circle", num_images=2),
                                     model=tiny_model)
    before = {p: open(p, "rb").read() for p in first + [os.path.join(out, "config.json"),
                                                        os.path.join(out, "grid.png")]}
    second = generate.generate_to_dir(_config(out_dir=out, prompt="a blue square", num_images=2,
                                              seed=5), model=tiny_model)
    assert [os.path.basename(p) for p in first] == ["00000-0.png", "00001-1.png"]
    assert [os.path.basename(p) for p in second] == ["00002-5.png", "00003-6.png"]
    assert all(open(p, "rb").read() == data for p, data in before.items())
    assert sorted(os.listdir(out)) == ["00000-0.png", "00001-1.png", "00002-5.png", "00003-6.png",
                                       "config-00002.json", "config.json", "grid-00002.png",
                                       "grid.png"]


# --- the command line: one line, no flag list, no traceback -----------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "generate.py: error: --prompt is required"),
    (["--prompt=a (red:.) circle", "--model=random:tiny"], "emphasis weight '.' at character 7"),
    (["--prompt=x", "--config.batch_size=-1"], "batch_size must be an integer >= 0"),
    (["--prompt=x", "extra"], "unexpected arguments: extra"),
    (["--prompt=x", "--num_images=abc"], "--num_images"),
])
def test_usage_errors_are_one_line_without_the_flag_list(tmp_path, args, message):
    result = run_python("-m", "experiments.generate", f"--out_dir={tmp_path / 'out'}", *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_plain_generate_prints_only_sdjax_lines(tmp_path):
    result = run_python("-m", "experiments.generate", "--prompt=a red circle", "--model=random:tiny",
                        "--config.steps=1", f"--out_dir={tmp_path}",
                        f"--config.compilation_cache={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines and all(("generate.py" in line or "exported.py" in line) for line in lines), lines
    assert result.stdout.strip() == str(tmp_path / "00000-0.png")


# --- weights ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_model, tmp_path, bad_value):
    from sdjax.weights import pretrained
    from sdjax.weights.common import WeightsError

    model = pretrained.Pretrained(**{**vars(tiny_model), "params": jax_tree_copy(tiny_model.params)})
    model.params["unet"]["conv_in"]["kernel"][0, 0, 0, 0] = bad_value
    pretrained.save_pretrained(model, tmp_path / "model")
    with pytest.raises(WeightsError, match=r"model.*unet.*conv_in/kernel: 1 of \d+ values are NaN "
                                           r"or infinite"):
        pretrained.load_pretrained(tmp_path / "model")


def jax_tree_copy(tree):
    import jax

    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


# --- prompts and config files -------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, weight", [("a (red:.) cat", "'.'"), ("(blue:1..5)", "'1..5'"),
                                            ("((x:.5.))", "'.5.'")])
def test_a_malformed_emphasis_weight_names_itself(prompt, weight):
    from sdjax.text.prompts import parse_emphasis

    with pytest.raises(ValueError, match=rf"emphasis weight {re.escape(weight)} at character \d+ "
                                         r"is not a number"):
        parse_emphasis(prompt)


def test_a_missing_config_file_is_one_line(tmp_path):
    result = run_python("-m", "experiments.generate", "--config=configs/no_such.py", "--prompt=x",
                        f"--out_dir={tmp_path}")
    assert result.returncode == 1
    assert "--config: no config file 'configs/no_such.py'" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


def test_an_image_size_beyond_the_devices_memory_is_refused_before_compiling(tiny_model):
    from sdjax.sampling import Generator

    generator = Generator(tiny_model, exported_programs=False)
    spec = SamplingSpec(steps=1, height=100000, width=100000)
    with pytest.raises(ValueError, match=r"100000x100000 needs about [\d,]+ GiB for the VAE decode "
                                         r"alone, more than this cpu device's [\d,]+ GiB"):
        generator(Request("a red circle"), spec)
    assert generator.traces == 0


@pytest.mark.parametrize("make_out_dir, message", [
    (lambda root: (root / "taken").write_text("a file"), "out_dir '{root}/taken' is a file, not a folder"),
])
def test_an_output_folder_that_is_a_file_is_one_line_and_left_alone(tmp_path, make_out_dir, message):
    make_out_dir(tmp_path)
    result = run_python("-m", "experiments.generate", "--prompt=x", "--model=random:tiny",
                        f"--out_dir={tmp_path / 'taken'}")
    assert result.returncode == 1
    assert message.format(root=tmp_path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_failing_disk_keeps_earlier_images_and_leaves_no_temporary_file(tmp_path, tiny_model,
                                                                           monkeypatch):
    import errno

    from sdjax import runs

    out = str(tmp_path)
    generate.generate_to_dir(_config(out_dir=out, prompt="a red circle"), model=tiny_model)
    before = open(os.path.join(out, "00000-0.png"), "rb").read()
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        generate.generate_to_dir(_config(out_dir=out, prompt="a red circle", seed=9),
                                 model=tiny_model)
    monkeypatch.setattr(runs.os, "fsync", real_fsync)
    assert open(os.path.join(out, "00000-0.png"), "rb").read() == before
    assert not [n for n in os.listdir(out) if n.endswith(".tmp") or "00001" in n]


@pytest.mark.parametrize("flag, what", [("--mask", "mask"), ("--init_image", "init image")])
def test_an_unreadable_image_file_is_one_line(tmp_path, flag, what):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])
    args = [f"--init_image={good}", f"--mask={broken}"] if flag == "--mask" else [f"--init_image={broken}"]
    result = run_python("-m", "experiments.generate", "--prompt=x", "--model=random:tiny",
                        f"--out_dir={tmp_path / 'out'}", *args)
    assert result.returncode == 1
    assert f"{what} '{broken}' cannot be read as an image" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- train checkpoints ------------------------------------------------------------------------------

def _damage_metadata(step_dir):
    (step_dir / "meta" / "metadata").write_text("{trunc")


def _damage_arrays(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            with open(path, "r+b") as f:
                f.truncate(100)


def _remove_tree_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("damage", [_damage_metadata, _damage_arrays, _remove_tree_metadata])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, caplog):
    from sdjax.training.checkpoints import Checkpoints
    from tests.helpers import make_state

    ckpt = Checkpoints(tmp_path, save_every=1, async_save=False)
    for step in (1, 2):
        ckpt.save(step, make_state(step), {"step": step})
    ckpt.wait()
    ckpt.close()
    damage(tmp_path / "2")
    with caplog.at_level("WARNING"):
        restored, meta = Checkpoints(tmp_path, save_every=1).restore(make_state(0))
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored.params["unet"]["big"]),
                                  np.asarray(make_state(1).params["unet"]["big"]))
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and f"{tmp_path}/2" in warnings[0] and "restored step 1" in warnings[0]
    assert len(warnings[0].splitlines()) == 1


def test_when_no_checkpoint_is_readable_the_error_is_one_line_naming_each(tmp_path):
    from sdjax.training.checkpoints import Checkpoints
    from tests.helpers import make_state

    ckpt = Checkpoints(tmp_path, save_every=1, async_save=False)
    for step in (1, 2):
        ckpt.save(step, make_state(step), {"step": step})
    ckpt.wait()
    ckpt.close()
    _damage_metadata(tmp_path / "1")
    _damage_metadata(tmp_path / "2")
    with pytest.raises(ValueError) as error:
        Checkpoints(tmp_path, save_every=1).restore(make_state(0))
    message = str(error.value)
    assert "no checkpoint restores into this run's train state" in message
    assert "2: JSONDecodeError" in message and "1: JSONDecodeError" in message
    assert len(message.splitlines()) == 1


def test_entry_points_run_from_another_directory(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--config=configs/shapes.py",
         "--prompt=a red circle", "--model=random:tiny", "--config.steps=1", "--out_dir=out",
         f"--config.compilation_cache={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "00000-0.png").is_file()


# --- training hyper-parameters and the non-finite guard ------------------------------------------------

@pytest.mark.parametrize("group, message", [
    ({"lr": math.nan}, "param group 'unet': lr must be a finite number, got nan"),
    ({"lr": math.inf}, "lr must be a finite number, got inf"),
    ({"lr": 1e39}, "lr must be a finite number, got 1e+39"),  # inf in float32
    ({"lr": -1e-4}, "lr must be > 0 for a trainable model"),
    ({"lr": 1e-4, "weight_decay": math.nan}, "weight_decay must be a finite number, got nan"),
    ({"lr": 1e-4, "b2": 1.0}, "b2 must be in [0, 1), got 1.0"),
    ({"lr": 1e-4, "eps": 0.0}, "eps must be > 0, got 0.0"),
    ({"lr": 1e-4, "warmup_steps": -5}, "warmup_steps must be an integer >= 0, got -5"),
])
def test_bad_optimizer_settings_are_refused_up_front(group, message):
    from sdjax.training.state import make_optimizer

    with pytest.raises(ValueError) as error:
        make_optimizer({"unet": group}, total_steps=10)
    assert message in str(error.value)


def test_bad_clip_norm_and_ema_decay_are_refused():
    from sdjax.training.state import EMAConfig, make_optimizer

    with pytest.raises(ValueError, match="grad_clip_norm must be a finite number > 0"):
        make_optimizer({"unet": {"lr": 1e-4}}, total_steps=10, grad_clip_norm=math.nan)
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\], got 1.5"):
        EMAConfig(decay=1.5)


def test_an_update_that_overflows_the_params_is_skipped():
    """Finite loss and gradients, but a learning rate so large the new params overflow: the step
    keeps the old params (so a 'last good state' never holds inf)."""
    import jax

    from sdjax.training import state as state_lib
    from sdjax.training import step as step_lib

    class Task:
        dtype = np.float32

        def loss(self, params, batch, key):
            return jax.numpy.sum(params["unet"]["w"] * batch["x"]), {}

    params = {"unet": {"w": np.full((4,), 3e38, np.float32)}}
    optimizer = state_lib.make_optimizer({"unet": {"lr": 3e38, "b1": 0.0, "b2": 0.0}}, 10)
    state = state_lib.init_train_state(params, optimizer, jax.random.key(0), use_ema=False)
    new, metrics = jax.jit(lambda s, b, k: step_lib.train_step(Task(), s, b, k))(
        state, {"x": np.full((4,), -1e-10, np.float32)}, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["finite"]) == 0
    np.testing.assert_array_equal(np.asarray(new.params["unet"]["w"]), params["unet"]["w"])
    assert int(new.step) == int(state.step)


def test_resumed_training_keeps_each_metrics_step_once(tmp_path):
    """After a crash, steps past the restored checkpoint were logged and will be replayed: the
    metrics file keeps exactly the steps up to the checkpoint (and drops a torn last line)."""
    import json

    from sdjax.training.loop import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')
    writer = MetricsWriter(str(tmp_path), resumed_step=3)
    for step in (4, 5):
        writer.write(step, {"step": step, "loss": 10.0 + step})
    writer.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 14.0, 15.0]


# --- prompt files -------------------------------------------------------------------------------------

def test_resuming_after_the_prompt_file_changed_refuses_and_keeps_the_images(tmp_path, tiny_model):
    import json

    from sdjax.sampling import batches

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    config = _config(num_images=1, steps=1)
    out = tmp_path / "out"
    batches.sample_to_dir(config, prompts, str(out), model=tiny_model)
    before = {p: p.read_bytes() for p in out.glob("*/*.png")}
    assert len(before) == 2
    prompts.write_text("a red circle\na green cross\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) drawn from other prompt-file lines .*"
                                         r"00001/0000-1.png: prompt 'a blue square' -> "
                                         r"'a green cross'"):
        batches.sample_to_dir(config, prompts, str(out), model=tiny_model)
    # An image whose manifest line was never written is checked by its PNG parameters.
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in batches.read_manifest(out)
                                if not e["path"].startswith("00001")))
    with pytest.raises(ValueError, match="00001/0000-1.png: its PNG parameters are not what "
                                         "prompt 1 draws now"):
        batches.sample_to_dir(config, prompts, str(out), model=tiny_model)
    assert {p: p.read_bytes() for p in out.glob("*/*.png")} == before
    prompts.write_text("a red circle\na blue square\n")  # back as it was: resumes, nothing to draw
    assert batches.sample_to_dir(config, prompts, str(out), model=tiny_model)["written"] == 0


# --- configs of the wrong type ---------------------------------------------------------------------------

@pytest.mark.parametrize("part, key, value, message", [
    ("unet", "block_out_channels", "abc", "UNetConfig.block_out_channels: expected tuple[int, ...], got 'abc'"),
    ("unet", "norm_num_groups", 2.5, "UNetConfig.norm_num_groups: expected int, got 2.5"),
    ("vae", "latent_channels", "4", "VAEConfig.latent_channels: expected int, got '4'"),
    ("vae", "scaling_factor", "x", "VAEConfig.scaling_factor: expected float, got 'x'"),
])
def test_a_config_json_value_of_the_wrong_type_names_the_file_and_field(tmp_path, part, key, value,
                                                                        message):
    import json

    from sdjax.weights import unet as unet_weights
    from sdjax.weights import vae as vae_weights
    from sdjax.weights.common import WeightsError
    from sdjax.weights.presets import preset

    folder = tmp_path / part
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**preset("tiny")[part], key: value}))
    load = unet_weights.load_unet_folder if part == "unet" else vae_weights.load_vae_folder
    with pytest.raises(WeightsError) as error:
        load(folder)
    assert str(error.value) == f"{folder / 'config.json'}: {message}"


@pytest.mark.parametrize("dtype", ["float8", "int8", "floaty"])
def test_an_unknown_storage_dtype_is_named_before_reading(dtype):
    import sdjax

    with pytest.raises(ValueError, match=rf"dtype '{dtype}' is not a floating-point dtype"):
        sdjax.load_pretrained(sdjax.DEFAULT_MODEL, dtype=dtype)


def test_training_an_unknown_compute_dtype_is_named():
    from configs.train_tiny import get_config
    from sdjax.training import loop

    config = get_config()
    with config.unlocked():
        config.compute_dtype = "float64"
    with pytest.raises(ValueError, match="compute_dtype 'float64' is not one of"):
        loop.build(config)


@pytest.mark.parametrize("key, message", [
    ("model.diffusion_model.time_embed.0.weight",
     r"U-Net: UNetConfig: unsupported diffusers config value time_embedding_dim=\d+ .*; the value "
     r"comes from the shape of model.diffusion_model.time_embed.0.weight \(\d+, \d+\): is that "
     r"tensor mis-shaped\?"),
    ("model.diffusion_model.input_blocks.1.1.proj_in.weight",
     r"U-Net: shape mismatch for down_blocks.0.attentions.0.proj_in.weight"),
])
def test_a_mis_shaped_tensor_in_a_single_file_is_named(tiny_sd, tmp_path, key, message):
    from safetensors.numpy import load_file, save_file

    import sdjax
    from sdjax.weights.common import WeightsError

    tensors = load_file(str(tiny_sd.single_file("sd1")))
    tensors[key] = np.zeros((tensors[key].shape[0] + 1,) + tensors[key].shape[1:], np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))}: {message}"):
        sdjax.load_pretrained(path)


@pytest.mark.parametrize("interval", [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.3, 0.3)])
def test_a_guidance_interval_that_never_guides_is_refused(tiny_arch, interval):
    arch, tokenizers = tiny_arch
    spec = SamplingSpec(steps=1, height=32, width=32, guidance_interval=interval)
    with pytest.raises(ValueError, match=r"guidance_interval must be \(start, end\) with 0 <= start "
                                         r"< end <= 1"):
        prepare_batch(arch, tokenizers, Request("a red circle"), spec)


def test_generate_into_a_folder_holding_another_runs_config_keeps_it(tmp_path, tiny_model):
    """A folder with a config.json but no numbered images (another tool's, or a prompt-file run's)."""
    (tmp_path / "config.json").write_text("theirs")
    (tmp_path / "grid.png").write_bytes(b"theirs")
    generate.generate_to_dir(_config(out_dir=str(tmp_path), prompt="a red circle", num_images=2),
                             model=tiny_model)
    assert (tmp_path / "config.json").read_text() == "theirs"
    assert (tmp_path / "grid.png").read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["00000-0.png", "00001-1.png", "config-00000.json",
                                            "config.json", "grid-00000.png", "grid.png"]
