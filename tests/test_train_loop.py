"""The training loop through its real door, `experiments/train.py`, in subprocesses: exact resume
after SIGKILL and SIGTERM, 8 devices vs 1, two hosts vs one, the non-finite stop, fine-tuning a
loaded checkpoint into a native folder that samples.

Every run shares one persistent compilation cache, so only the first compiles the tiny step.
"""
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax import parallel
from sdjax.data import shapes
from sdjax.training import loop
from sdjax.training import step as step_lib
from sdjax.training.checkpoints import Checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
BATCH = 8   # a multiple of 8 devices


def write_shapes_folder(folder, count: int = 16, seed: int = 0) -> str:
    """`count` 32x32 shapes-world images with their captions beside them."""
    os.makedirs(folder, exist_ok=True)
    for i, example in enumerate(itertools.islice(shapes.train_examples(seed, 32), count)):
        Image.fromarray(example.image).save(os.path.join(folder, f"{i:03d}.png"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w") as f:
            f.write(example.caption)
    return str(folder)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_loop")
    data = write_shapes_folder(root / "data")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    return {"root": root, "data": data, "env": env}


def _args(setting, workdir, *overrides):
    base = {"total_steps": STEPS, "log_every": 1, "data.batch_size": BATCH,
            "data.folder": setting["data"], "checkpoint.every": 10, "checkpoint.keep": 10,
            "sample.every": 0}
    args = [sys.executable, "-m", "experiments.train", "--config=configs/train_tiny.py",
            f"--workdir={workdir}", "--progress=false"]
    args += [f"--config.{k}={v}" for k, v in base.items()]
    return args + list(overrides)


def _start(setting, workdir, *overrides, devices: int = 1, extra=()):
    env = dict(setting["env"])
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    log = open(os.path.join(str(workdir) + ".log"), "a")
    return subprocess.Popen(_args(setting, workdir, *overrides) + list(extra), cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, workdir, timeout=400):
    code = proc.wait(timeout=timeout)
    assert code == 0, open(str(workdir) + ".log").read()[-4000:]


def _steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _wait_for_checkpoint(proc, workdir, above: int, timeout=400):
    start = time.time()
    while time.time() - start < timeout:
        if any(s > above for s in _steps(workdir)):
            return
        assert proc.poll() is None, open(str(workdir) + ".log").read()[-4000:]
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint above {above} in {workdir}")


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _restore(workdir, step):
    """The checkpoint `step` of a run, restored on this process's single device."""
    from configs.train_tiny import get_config

    state = loop.build(get_config()).state
    state = step_lib.place(state, step_lib.state_sharding(parallel.make_mesh(), state))
    restored, meta = Checkpoints(os.path.join(workdir, "checkpoints")).restore(state, step)
    return jax.device_get(restored.replace(rng=jax.random.key_data(restored.rng))), meta


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_params_close(state, expected):
    """Same training up to float rounding. The batch-mean reductions sum in another order over
    several devices (~1e-6 relative on the loss), and Adam's m / sqrt(v) magnifies that for
    weights whose gradients are tiny (measured: relative L2 3.5e-6 overall, 8.6e-5 at worst on
    one weight that 10 steps of lr 1e-3 may move by 1e-2)."""
    ours, theirs = _flat(state.params), _flat(expected.params)
    diff = sum(np.sum(np.square(ours[k] - v)) for k, v in theirs.items())
    norm = sum(np.sum(np.square(v)) for v in theirs.values())
    assert np.sqrt(diff / norm) < 2e-5
    worst = max(np.max(np.abs(ours[k] - v)) for k, v in theirs.items())
    assert worst < 1e-3


@pytest.fixture(scope="module")
def reference(setting):
    """An uninterrupted single-process run to STEPS."""
    workdir = setting["root"] / "reference"
    _finish(_start(setting, workdir), workdir)
    return workdir


@pytest.mark.slow  # about a minute: several subprocess runs
def test_resume_after_sigkill_and_sigterm_is_bit_identical(setting, reference):
    workdir = setting["root"] / "interrupted"
    proc = _start(setting, workdir)
    _wait_for_checkpoint(proc, workdir, above=0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_steps(workdir))
    assert killed_at < STEPS, "the run finished before it could be killed"

    proc = _start(setting, workdir)
    _wait_for_checkpoint(proc, workdir, above=killed_at)
    proc.send_signal(signal.SIGTERM)
    _finish(proc, workdir)  # preemption is a clean exit, after a checkpoint of the current step
    stopped_at = max(_steps(workdir))
    log = open(str(workdir) + ".log").read()
    assert stopped_at == STEPS or "SIGTERM: saving step" in log

    _finish(_start(setting, workdir), workdir)
    assert max(_steps(workdir)) == STEPS
    resumed, meta = _restore(workdir, STEPS)
    expected, expected_meta = _restore(reference, STEPS)
    assert meta == expected_meta
    for name, value in _flat(expected).items():
        np.testing.assert_array_equal(_flat(resumed)[name], value, err_msg=name)
    assert _losses(workdir)[STEPS] == _losses(reference)[STEPS]


@pytest.mark.slow  # about a minute: several subprocess runs
def test_eight_devices_match_one_and_restore_on_one(setting, reference):
    workdir = setting["root"] / "eight"
    _finish(_start(setting, workdir, "--config.total_steps=10", "--config.fsdp=2", devices=8),
            workdir)
    ours, theirs = _losses(workdir), _losses(reference)
    np.testing.assert_allclose([ours[s] for s in range(1, 11)], [theirs[s] for s in range(1, 11)],
                               rtol=1e-5)
    # The 8-device checkpoint restores here on one device, to the params its run exported.
    restored, meta = _restore(workdir, 10)
    assert meta["step"] == 10
    from sdjax.weights.pretrained import load_pretrained
    exported = load_pretrained(workdir / "export").params
    params = loop.export_params(restored, use_ema=True)
    for name, value in _flat(exported).items():
        np.testing.assert_array_equal(_flat(params)[name], value, err_msg=name)
    _assert_params_close(restored, _restore(reference, 10)[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # about a minute: several subprocess runs
def test_two_processes_train_like_one(setting, reference):
    workdir = setting["root"] / "two_hosts"
    port = _free_port()
    procs = [_start(setting, workdir, "--config.total_steps=10",
                    extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                           f"--process_id={i}")) for i in range(2)]
    for proc in procs:
        _finish(proc, workdir)
    ours, theirs = _losses(workdir), _losses(reference)
    np.testing.assert_allclose([ours[s] for s in range(1, 11)], [theirs[s] for s in range(1, 11)],
                               rtol=1e-5)
    restored, _ = _restore(workdir, 10)
    _assert_params_close(restored, _restore(reference, 10)[0])
    assert os.path.isfile(workdir / "export" / "sdjax.json")


def test_nonfinite_steps_stop_the_run_after_a_checkpoint_of_the_last_good_state(setting):
    workdir = setting["root"] / "diverged"
    # Infinite offset noise makes every step's loss NaN from the first.
    proc = _start(setting, workdir, "--config.ldm.offset_noise=1e30",
                  "--config.max_consecutive_nonfinite=3")
    assert proc.wait(timeout=400) != 0
    log = open(str(workdir) + ".log").read()
    assert "3 consecutive non-finite steps" in log
    assert _steps(workdir) == [3]
    restored, meta = _restore(workdir, 3)
    assert meta["nonfinite_steps"] == 3 and int(restored.step) == 0
    from configs.train_tiny import get_config
    initial = loop.build(get_config()).state
    for name, value in _flat(initial.params).items():
        np.testing.assert_array_equal(_flat(restored.params)[name], value, err_msg=name)


def test_hard_negatives_come_from_the_function_the_config_names():
    from configs import shapes_clip
    from sdjax.text.tokenizer import CLIPTokenizer

    write = loop.import_function(shapes_clip.get_config().clip.hard_negative_captions)
    assert write is shapes.hard_negative_captions
    tokenizer = CLIPTokenizer.default()
    captions = [e.caption for e in itertools.islice(shapes.train_examples(0, 32), 3)]
    ids = loop.hard_negative_ids(captions, tokenizer, write, 2, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    expected = [n for c in captions for n in shapes.hard_negative_captions(c, rng, 2)]
    assert ids.shape == (3, 2, 77)
    np.testing.assert_array_equal(ids.reshape(6, 77), tokenizer(expected))


def test_hard_negatives_without_a_function_to_write_them_are_an_error():
    from configs.train_tiny import get_config

    config = get_config("clip")
    config.clip.hard_negatives = 2
    with pytest.raises(ValueError, match="hard_negative_captions"):
        loop.build(config)
    config.clip.hard_negative_captions = "sdjax.data.shapes:no_such_function"
    with pytest.raises(ValueError, match="no_such_function"):
        loop.build(config)
    config.clip.hard_negative_captions = "sdjax.data.shapes.hard_negative_captions"
    with pytest.raises(ValueError, match="package.module:function"):
        loop.build(config)


def test_shapes_clip_trains_with_hard_negatives(setting):
    workdir = setting["root"] / "clip_hard_negatives"
    args = [sys.executable, "-m", "experiments.train", "--config=configs/shapes_clip.py:2",
            f"--workdir={workdir}", "--progress=false", "--config.clip.hard_negatives=2",
            f"--config.data.folder={setting['data']}", f"--config.data.batch_size={BATCH}",
            "--config.clip.layers=1", "--config.log_every=1",
            "--config.checkpoint.async_save=false"]
    out = subprocess.run(args, cwd=REPO, env=setting["env"], capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2] and np.isfinite(list(losses.values())).all()
    # The export is a native CLIP folder that the CLIP scorer reads; load_pretrained says so.
    from sdjax.evaluation.metrics import load_clip_scorer
    from sdjax.weights.common import WeightsError
    from sdjax.weights.pretrained import load_pretrained

    scorer = load_clip_scorer(workdir / "export")
    assert scorer.config.text.num_layers == 1
    with pytest.raises(WeightsError, match="an sdjax CLIP model .*load_clip_scorer"):
        load_pretrained(workdir / "export")


def test_training_another_parameterisation_exports_and_previews_it(tmp_path):
    """v-prediction training of an epsilon checkpoint: the export's scheduler and the preview
    grids' sampler use v-prediction."""
    from configs.train_tiny import get_config
    from sdjax.weights.architecture import Architecture
    from sdjax.weights.pretrained import load_pretrained

    config = get_config()
    with config.unlocked():
        config.ldm.prediction_type = "v_prediction"
    setup = loop.build(config)
    assert setup.task.prediction_type == "v_prediction"
    assert Architecture.of(setup.model).schedule.prediction_type == "v_prediction"
    loop.export(setup, setup.state, str(tmp_path / "export"))
    assert load_pretrained(tmp_path / "export").scheduler_config["prediction_type"] == "v_prediction"


@pytest.mark.slow
def test_finetune_from_a_loaded_checkpoint_exports_a_folder_that_samples(setting):
    from sdjax.weights.presets import random_pretrained
    from sdjax.sampling import Generator, Request, SamplingSpec
    from sdjax.weights.pretrained import load_pretrained, save_pretrained

    init = setting["root"] / "init"
    save_pretrained(random_pretrained("tiny", seed=3), init)
    workdir = setting["root"] / "finetune"
    _finish(_start(setting, workdir, f"--config.init_from={init}", "--config.total_steps=4",
                   "--config.sample.every=4", "--config.sample.steps=2"), workdir)
    assert os.path.isfile(workdir / "samples" / "step_0000004.png")
    with open(workdir / "config.json") as f:
        assert json.load(f)["init_from"] == str(init)
    model = load_pretrained(workdir / "export")
    start = load_pretrained(init)
    assert not np.array_equal(model.params["unet"]["conv_in"]["kernel"],
                              start.params["unet"]["conv_in"]["kernel"])
    out = Generator(model)(Request(prompt="a red circle", seed=1),
                           SamplingSpec(sampler="ddim", steps=2, height=32, width=32))
    assert out["images"].shape == (1, 32, 32, 3) and np.isfinite(out["images"]).all()


@pytest.mark.slow  # a measurement (the reference run takes ~40 s)
def test_reference_throughput(reference):
    with open(os.path.join(reference, "metrics.jsonl")) as f:
        rates = [r["examples_per_sec"] for r in map(json.loads, f)][5:]  # after compilation
    print(f"tiny config, 1 CPU device, batch {BATCH}: median {np.median(rates):.1f} examples/s")
    assert np.median(rates) > 0
