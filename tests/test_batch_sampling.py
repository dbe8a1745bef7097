"""`sdjax.sampling.batches` and `experiments/sample.py`: prompt files, the job plan and host shares,
kill-and-resume to the same files, and a two-process run on 127.0.0.1 that writes what one writes."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from configs import sd15
from sdjax.sampling import batches as bs
from sdjax import images as images_lib
from sdjax.weights.presets import random_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS_JSONL = [
    {"prompt": "a red circle"},
    {"prompt": "a blue square on the left", "negative_prompt": "green"},
    {"prompt": "a yellow triangle", "steps": 3},  # a second static group, so a second program
    {"prompt": "two purple stars", "cfg_scale": 4.0, "seed": 1000},
    {"prompt": "an orange ring", "num_images": 2},
]
IMAGES_PER_PROMPT = 4
TOTAL = 4 * IMAGES_PER_PROMPT + 2


def config(**overrides):
    c = sd15.get_config()
    c.height, c.width, c.steps, c.sampler = 32, 32, 2, "euler"
    c.num_images = IMAGES_PER_PROMPT
    for name, value in overrides.items():
        setattr(c, name, value)
    return c


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- prompt files -----------------------------------------------------------------------------------

def test_text_prompts_skip_blanks_and_comments_and_take_config_defaults(tmp_path):
    path = write(tmp_path / "p.txt", "# header\na cat\n\n   \n  a dog  \n#a bird\na (red:1.2) fox\n")
    prompts = bs.read_prompts(path, config(seed=10, cfg_scale=6.0))
    assert [p.prompt for p in prompts] == ["a cat", "a dog", "a (red:1.2) fox"]
    assert [p.line for p in prompts] == [2, 5, 7]
    # Prompt p's seed is config.seed + p * images per prompt: seeds never overlap between prompts.
    assert [p.seed for p in prompts] == [10, 14, 18]
    assert {(p.cfg_scale, p.steps, p.sampler, p.num_images, p.negative_prompt) for p in prompts} == {
        (6.0, 2, "euler", IMAGES_PER_PROMPT, "")}


def test_jsonl_fields_override_the_config(tmp_path):
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(p) for p in PROMPTS_JSONL) + "\n# done\n")
    prompts = bs.read_prompts(path, config(negative_prompt="ugly"))
    assert [p.steps for p in prompts] == [2, 2, 3, 2, 2]
    assert [p.seed for p in prompts] == [0, 4, 8, 1000, 16]
    assert [p.cfg_scale for p in prompts] == [7.5, 7.5, 7.5, 4.0, 7.5]
    assert [p.num_images for p in prompts] == [4, 4, 4, 4, 2]
    assert [p.negative_prompt for p in prompts] == ["ugly", "green", "ugly", "ugly", "ugly"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat", "stepz": 3}', "p.jsonl:2: unknown field 'stepz'"),
    ('{"prompt": "a cat", "steps": "3"}', "p.jsonl:2: field 'steps' must be int"),
    ('{"prompt": "a cat", "cfg_scale": true}', "p.jsonl:2: field 'cfg_scale' must be int or float"),
    ('{"prompt": 3}', "p.jsonl:2: field 'prompt' must be str"),
    ('{"prompt": "a cat"', "p.jsonl:2: not valid JSON"),
    ('["a cat"]', "p.jsonl:2: expected a JSON object, got list"),
    ('{"sampler": "eulerr"}', "p.jsonl:2: unknown sampler 'eulerr'"),
    ('{"num_images": 0}', "p.jsonl:2: field 'num_images' must be >= 1"),
    ('{"seed": 4294967295, "num_images": 2}', "p.jsonl:2: seeds 4294967295..4294967296"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = write(tmp_path / "p.jsonl", '{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(bs.PromptFileError, match=message.replace("(", r"\(").replace("[", r"\[")):
        bs.read_prompts(path, config())


def test_empty_or_missing_prompt_files_are_errors(tmp_path):
    with pytest.raises(bs.PromptFileError, match="no prompts"):
        bs.read_prompts(write(tmp_path / "p.txt", "# nothing\n\n"), config())
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        bs.read_prompts(tmp_path / "missing.txt", config())


# --- planning -----------------------------------------------------------------------------------------

def _plan(path, batch_size):
    prompts = bs.read_prompts(path, config())
    jobs = bs.plan_jobs(prompts)
    key = lambda job: (prompts[job.prompt_index].steps, prompts[job.prompt_index].cfg_scale)
    return jobs, bs.plan_batches(jobs, key, batch_size), key


@pytest.mark.parametrize("batch_size, processes", [(1, 1), (3, 1), (2, 2), (4, 2), (6, 3), (8, 4)])
def test_plan_is_deterministic_and_host_shares_partition_the_jobs(tmp_path, batch_size, processes):
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(p) for p in PROMPTS_JSONL))
    jobs, batches, key = _plan(path, batch_size)
    assert len(jobs) == TOTAL == len({j.path for j in jobs}) == len({j.seed for j in jobs})
    assert jobs[5].path == os.path.join("00001", "0001-5.png")
    assert _plan(path, batch_size)[1] == batches
    for batch in batches:
        assert 1 <= len(batch.jobs) <= batch.size == batch_size
        assert {key(job) for job in batch.jobs} == {batch.key}
    shares = [bs.host_jobs(batches, p, processes) for p in range(processes)]
    flat = [job for share in shares for job in share]
    assert len(flat) == len(set(flat)) == len(jobs)
    assert set(flat) == set(jobs)
    # Each program compiles once: a group's batches are all full but its last.
    by_key = {}
    for batch in batches:
        by_key.setdefault(batch.key, []).append(len(batch.jobs))
    for sizes in by_key.values():
        assert all(size == batch_size for size in sizes[:-1])
    assert len(by_key) == 3  # steps 3; cfg 4.0; everything else


@pytest.fixture(scope="module")
def tiny_model():
    model = random_pretrained("tiny")
    return model


def test_static_groups_split_on_chunk_count_and_guidance(tmp_path, tiny_model):
    long_prompt = " ".join(["cat"] * 90)  # more than 75 tokens: two CLIP windows
    lines = [{"prompt": "a cat"}, {"prompt": long_prompt}, {"prompt": "a dog", "cfg_scale": 1.0},
             {"prompt": "a cow", "sampler": "ddim"}, {"prompt": "a pig"}]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(p) for p in lines))
    sampler = bs.BatchSampler(config(num_images=1), bs.read_prompts(path, config(num_images=1)),
                              model=tiny_model)
    assert sampler.chunks == [1, 2, 1, 1, 1]
    assert not sampler.specs[2].guidance and sampler.specs[0].guidance
    # karras=False from the config is dropped for ddim, which has no such option.
    assert dict(sampler.specs[3].sampler_options) == {}
    assert [[j.prompt_index for j in b.jobs] for b in sampler.batches] == [[0], [4], [1], [2], [3]]
    assert sampler.key_of(sampler.jobs[0]) == sampler.key_of(sampler.jobs[4])
    with pytest.raises(ValueError, match="line 1: height must be a positive multiple of 8"):
        bs.BatchSampler(config(), bs.read_prompts(write(tmp_path / "h.jsonl", '{"height": 30}'),
                                                  config()), model=tiny_model)


# --- the CLI, killed and resumed; two processes ------------------------------------------------------

@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    from sdjax.weights.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("sample")
    save_pretrained(random_pretrained("tiny"), root / "tiny")
    prompts = write(root / "prompts.jsonl", "\n".join(json.dumps(p) for p in PROMPTS_JSONL) + "\n")
    return root, prompts


def _command(root, prompts, out_dir, *extra):
    return [sys.executable, "-m", "experiments.sample", "--config=configs/sd15.py",
            f"--model={root / 'tiny'}", f"--prompts={prompts}", f"--out_dir={out_dir}",
            f"--images_per_prompt={IMAGES_PER_PROMPT}", "--config.height=32", "--config.width=32",
            "--config.steps=2", "--config.sampler=euler", "--config.progress=false",
            f"--config.compilation_cache={root / 'xla'}", *extra]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return env


def _run(args, timeout=300):
    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _pngs(out_dir: pathlib.Path) -> dict:
    return {str(p.relative_to(out_dir)): p for p in sorted(out_dir.glob("*/*.png"))}


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _written(log: str) -> tuple[int, int]:
    """(written, already there) from the CLI's last line."""
    line = [l for l in log.splitlines() if "already there" in l][-1]
    words = line.split("]")[-1].split()
    return int(words[0]), int(words[2])


@pytest.fixture(scope="module")
def uninterrupted(run_setup):
    root, prompts = run_setup
    out = root / "uninterrupted"
    log = _run(_command(root, prompts, out))
    assert _written(log) == (TOTAL, 0)
    return out


def test_uninterrupted_run_writes_every_job_with_its_parameters(uninterrupted):
    files = _pngs(uninterrupted)
    assert len(files) == TOTAL
    assert "00003/0002-1002.png" in files and "00004/0001-17.png" in files
    text = images_lib.read_parameters(files["00002/0001-9.png"])
    assert text.startswith("a yellow triangle\n")
    assert "Steps: 3, Sampler: euler, CFG scale: 7.5, Seed: 9, Size: 32x32" in text
    assert "Negative prompt: green" in images_lib.read_parameters(files["00001/0000-4.png"])
    assert len({_pixels(p).tobytes() for p in files.values()}) == TOTAL
    manifest = bs.read_manifest(uninterrupted)
    assert sorted(e["path"] for e in manifest) == sorted(files)
    assert not list(uninterrupted.glob("*/*.tmp"))


def test_image_equals_the_generator_drawing_the_prompt_alone(uninterrupted, run_setup):
    from sdjax.sampling import Generator, Request, SamplingSpec
    from sdjax.weights.pretrained import load_pretrained

    root, _ = run_setup
    generator = Generator(load_pretrained(root / "tiny"))
    out = generator(Request(prompt="a blue square on the left", negative_prompt="green", seed=6,
                            num_images=1, cfg_scale=7.5),
                    SamplingSpec(sampler="euler", steps=2, height=32, width=32,
                                 sampler_options=(("karras", False),)))
    np.testing.assert_array_equal(images_lib.to_uint8(out["images"][0]),
                                  _pixels(uninterrupted / "00001" / "0002-6.png"))


def test_killed_run_resumes_to_the_same_files_writing_each_once(run_setup, uninterrupted):
    root, prompts = run_setup
    out = root / "killed"
    process = subprocess.Popen(_command(root, prompts, out), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not _pngs(out) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGSTOP)  # freeze first, so the count below is what it left
        before = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in _pngs(out).items()}
        process.kill()
    finally:
        process.kill()
        process.wait()
    assert 0 < len(before) < TOTAL, f"killed after {len(before)} of {TOTAL} images"

    log = _run(_command(root, prompts, out))
    assert _written(log) == (TOTAL - len(before), len(before))
    files, reference = _pngs(out), _pngs(uninterrupted)
    assert files.keys() == reference.keys()
    for name in files:
        np.testing.assert_array_equal(_pixels(files[name]), _pixels(reference[name]), err_msg=name)
        assert images_lib.read_parameters(files[name]) == images_lib.read_parameters(reference[name])
    # Files from before the kill were not rewritten; every image is in the manifest exactly once.
    after = {name: (files[name].stat().st_ino, files[name].stat().st_mtime_ns) for name in before}
    assert after == before
    paths = [entry["path"] for entry in bs.read_manifest(out)]
    assert sorted(paths) == sorted(files)


def test_a_second_launch_loads_its_programs_instead_of_tracing(run_setup, uninterrupted):
    root, prompts = run_setup
    out = root / "second_launch"
    log = _run(_command(root, prompts, out))  # same compilation cache as the first launch
    assert _written(log) == (TOTAL, 0)
    assert "0 program trace(s)" in log, log[-2000:]
    assert list((root / "xla" / "sdjax_exported").glob("*.exported"))
    for name, path in _pngs(uninterrupted).items():
        np.testing.assert_array_equal(_pixels(out / name), _pixels(path), err_msg=name)


def test_resuming_with_other_image_settings_is_refused(tmp_path):
    bs._check_and_write_config(config(), str(tmp_path))
    bs._check_and_write_config(config(out_dir="elsewhere", batch_size=8), str(tmp_path))
    with pytest.raises(ValueError,
                       match=r"config.json: .*\(cfg_scale: 7.5 -> 5.0\); use another --out_dir"):
        bs._check_and_write_config(config(cfg_scale=5.0), str(tmp_path))
    assert json.loads((tmp_path / bs.CONFIG_FILE).read_text())["batch_size"] == 8


def test_a_torn_manifest_line_does_not_swallow_the_next(tmp_path):
    manifest = tmp_path / bs.MANIFEST
    manifest.write_text('{"path": "00000/0000-0.png"}\n{"path": "000')
    job = bs.Job(index=1, prompt_index=0, image_index=1, seed=1)
    bs._reconcile_manifest(str(tmp_path), str(manifest), [job],
                           lambda j: {"path": j.path})
    assert [e["path"] for e in bs.read_manifest(tmp_path)] == ["00000/0000-0.png", job.path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_files_of_one(run_setup, uninterrupted):
    root, _ = run_setup
    # The first two prompts (one static group, so one compile per process) and their seeds.
    prompts = write(root / "two.jsonl", "\n".join(json.dumps(p) for p in PROMPTS_JSONL[:2]))
    out = root / "two"
    address = f"127.0.0.1:{_free_port()}"
    processes = [subprocess.Popen(
        _command(root, prompts, out, f"--coordinator_address={address}", "--num_processes=2",
                 f"--process_id={i}"), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=300)[1])
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    written = [_written(log)[0] for log in logs]
    assert sum(written) == 2 * IMAGES_PER_PROMPT and min(written) > 0
    files = _pngs(out)
    reference = {k: v for k, v in _pngs(uninterrupted).items()
                 if k.split(os.sep)[0] in ("00000", "00001")}
    assert files.keys() == reference.keys()
    for name in files:
        assert files[name].read_bytes() == reference[name].read_bytes(), name
    manifests = sorted(p.name for p in out.glob("manifest*.jsonl"))
    assert manifests == ["manifest-00000-of-00002.jsonl", "manifest-00001-of-00002.jsonl"]
    assert sorted(e["path"] for e in bs.read_manifest(out)) == sorted(files)
