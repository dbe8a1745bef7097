"""CI smoke runs of the speed benchmarks: each script runs at --preset=tiny (without the
diffusers-Flax venv) and prints its table with a row per implementation / launch."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, tmp_path):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--preset=tiny", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def _rows(stdout, first_cell):
    """Table rows whose first cell contains `first_cell`, as lists of cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("|")]
    return [r for r in rows if first_cell in r[0]]


def _number(cell):
    assert re.fullmatch(r"[0-9.e+-]+", cell), cell
    return float(cell)


def test_unet_forward_prints_sdjax_and_pytorch_rows_that_agree(tmp_path):
    stdout = _run("unet_forward", "--sizes=8", "--dtypes=float32", "--repeats=1",
                  "--matmul=128", "--flax_venv=", tmp_path=tmp_path)
    assert "matmul ceiling" in stdout
    rows = _rows(stdout, "8x8")
    by_name = {r[2]: r for r in rows}
    assert set(by_name) == {"sdjax", "diffusers (PyTorch)"}, stdout
    sdjax, torch_row = by_name["sdjax"], by_name["diffusers (PyTorch)"]
    assert _number(sdjax[3]) > 0 and _number(sdjax[6]) > 0  # seconds, GFLOP/s
    assert _number(torch_row[5]) > 0  # sdjax / PyTorch
    # Same weights, same inputs: the two networks' outputs agree.
    assert _number(sdjax[7]) > 0  # the matmul ceiling read in the same loop
    assert _number(torch_row[10]) < 1e-3


def test_txt2img_prints_generator_and_pipeline_rows(tmp_path):
    stdout = _run("txt2img", "--steps=2", "--repeats=1", f"--workdir={tmp_path}",
                  tmp_path=tmp_path)
    assert "2 steps" in stdout
    assert len(_rows(stdout, "sdjax Generator")) == 1
    (reference,) = _rows(stdout, "StableDiffusionPipeline")
    assert _number(reference[1]) > 0 and _number(reference[4]) > 0


@pytest.mark.slow  # the tiny benchmark still takes 25-40 s
def test_compile_time_prints_each_launch_and_the_cache_hits(tmp_path):
    stdout = _run("compile_time", "--steps=1,3", "--cache_steps=3", tmp_path=tmp_path)
    assert len(_rows(stdout, "1 steps, no persistent cache")) == 1
    assert len(_rows(stdout, "3 steps, no persistent cache")) == 1
    (first,) = _rows(stdout, "first launch")
    (second,) = _rows(stdout, "second launch")
    assert re.fullmatch(r"0 hit / [1-9]\d* miss", first[5]), first
    assert re.fullmatch(r"[1-9]\d* hit / 0 miss", second[5]), second
    # Loading from the cache skips XLA compilation.
    assert _number(second[2]) < _number(first[2])
    # diffusers-Flax's pipeline compile, one row per step count where its venv exists (not in CI).
    flax_rows = _rows(stdout, "diffusers 0.39 (Flax)")
    if os.path.exists(os.path.join(ROOT, ".venv-flax-ref", "bin", "python")):
        assert [r[0] for r in flax_rows] == ["diffusers 0.39 (Flax) 1 steps",
                                             "diffusers 0.39 (Flax) 3 steps"], stdout
        for row in flax_rows:
            assert _number(row[2]) > 0 and _number(row[7]) > 0  # compile s, sdjax / this
    else:
        assert not flax_rows and "diffusers 0.39 (Flax): not run (no venv" in stdout


@pytest.mark.slow  # the tiny benchmark still takes 25-40 s
def test_train_step_prints_both_sides_throughput_and_memory(tmp_path):
    stdout = _run("train_step", "--repeats=2", f"--workdir={tmp_path}", tmp_path=tmp_path)
    assert "trained text_encoder+unet, EMA on" in stdout, stdout
    (ours,) = _rows(stdout, "sdjax")
    (reference,) = _rows(stdout, "diffusers (PyTorch)")
    for row in (ours, reference):
        seconds, examples_per_s = _number(row[1]), _number(row[3])
        assert examples_per_s == pytest.approx(4 / seconds, rel=0.02)  # train_tiny's batch of 4
        assert _number(row[6]) > 100  # peak RSS MiB of a process that imported its framework
        # Same weights and batch, both losses are epsilon MSEs of an untrained model: near 1.
        assert 0.3 < _number(row[7]) < 3
    assert _number(reference[4]) == pytest.approx(_number(ours[1]) / _number(reference[1]),
                                                  rel=0.02)


@pytest.mark.slow  # the tiny benchmark still takes 25-40 s
def test_load_memory_prints_load_and_sampling_rows(tmp_path):
    stdout = _run("load_memory", f"--workdir={tmp_path}", tmp_path=tmp_path)
    rows = _rows(stdout, "")
    works = {(r[0], r[1]) for r in rows[2:]}
    assert works == {(name, work) for name in ("sdjax", "diffusers (PyTorch)")
                     for work in ("load", "load + sample 32 px")}, stdout
    for r in rows[2:]:
        base, peak = _number(r[4]), _number(r[5])
        assert peak >= base > 0
        assert _number(r[2]) == pytest.approx(2.56, abs=0.01)  # the tiny preset's params (M)


def test_tokenizer_prints_sdjax_and_transformers_rows_with_the_same_ids(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.tokenizer", "--prompts=40",
                          "--repeats=1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.startswith("40 prompts"), out.stdout
    rows = _rows(out.stdout, "")[2:]  # below the header and its rule
    names = {(r[0], r[1]) for r in rows}
    assert {("sdjax", "batch"), ("transformers CLIPTokenizer", "batch"),
            ("sdjax", "one by one"), ("transformers CLIPTokenizer", "one by one")} <= names
    for row in rows:
        assert _number(row[2]) > 0 and _number(row[4]) > 0  # median s, prompts/s
        assert row[7] == "yes", row


def test_lora_forward_prints_runtime_merged_and_fused_rows_whose_outputs_agree(tmp_path):
    stdout = _run("lora", "--modes=forward", "--sizes=8", "--repeats=1", "--matmul=128",
                  f"--workdir={tmp_path}", tmp_path=tmp_path)
    rows = {r[1]: r for r in _rows(stdout, "8x8")}
    assert set(rows) == {"sdjax base", "sdjax merged", "sdjax run-time", "diffusers unfused",
                         "diffusers fused"}, stdout
    for name, row in rows.items():
        merged = rows["diffusers fused" if name.startswith("diffusers") else "sdjax merged"]
        # "/ its merged": this row's median over its own side's merged (fused) median.
        assert _number(row[4]) == pytest.approx(_number(row[2]) / _number(merged[2]), rel=0.02)
    assert _number(rows["sdjax run-time"][7]) > 0  # the matmul ceiling read in the same loop
    # The LoRA moves the output, and both sides apply the same one, at run time and merged.
    effect = float(re.search(r"changes the output by up to ([0-9.e+-]+)", stdout).group(1))
    assert effect > 1e-2, stdout
    assert _number(rows["sdjax run-time"][10]) < 1e-4  # run time vs merged, sdjax
    assert _number(rows["diffusers unfused"][10]) < 1e-4  # vs sdjax run time
    assert _number(rows["diffusers fused"][10]) < 1e-4  # vs sdjax merged
    assert re.search(r"8x8: run-time LoRA overhead sdjax [+-][0-9.]+%, diffusers [+-][0-9.]+%",
                     stdout), stdout


@pytest.mark.slow  # two worker processes: ~15 s
def test_lora_merge_prints_both_sides_merging_the_same_factors_into_the_same_weights(tmp_path):
    stdout = _run("lora", "--modes=merge", "--repeats=2", f"--workdir={tmp_path}",
                  tmp_path=tmp_path)
    assert "rank 128 alpha 64" in stdout and "matmul ceiling" in stdout, stdout
    (ours,) = _rows(stdout, "sdjax merge")
    (reference,) = _rows(stdout, "diffusers fuse_lora")
    for row in (ours, reference):
        assert _number(row[1]) > 0 and _number(row[2]) > 0  # first merge, later median
        loaded, peak = _number(row[7]), _number(row[8])
        assert peak >= loaded > 100
    # Sum of squares of every merged kernel: the same on both sides, and not the base's.
    assert _number(ours[10]) == pytest.approx(_number(reference[10]), rel=1e-6)
    base = float(re.search(r"before merging ([0-9.e+-]+)", stdout).group(1))
    assert abs(_number(ours[10]) - base) > 1e-3 * base, stdout
    assert _number(reference[4]) == pytest.approx(_number(ours[2]) / _number(reference[2]),
                                                  rel=0.02)


# Two (with the full fine-tune, three) workers compiling train steps: ~30 s and more.
@pytest.mark.slow
@pytest.mark.parametrize("full_finetune", [False, True])
def test_lora_train_prints_lora_steps_of_both_sides_and_their_memory(tmp_path, full_finetune):
    stdout = _run("lora", "--modes=train", "--repeats=2", f"--workdir={tmp_path}",
                  f"--full_finetune={full_finetune}", tmp_path=tmp_path)
    assert "rank 4 alpha 1 on 60 layers of text_encoder+unet" in stdout, stdout  # train_lora_tiny
    names = ["sdjax LoRA", "diffusers LoRA (PyTorch, peft)"] + (
        ["sdjax full fine-tune"] if full_finetune else [])
    rows = {r[0]: r for r in _rows(stdout, "")[2:]}
    assert list(rows) == names, stdout
    for row in rows.values():
        seconds, examples_per_s = _number(row[1]), _number(row[3])
        assert examples_per_s == pytest.approx(4 / seconds, rel=0.02)  # train_lora_tiny's batch
        assert _number(row[6]) > 100  # peak RSS MiB
        assert 0.3 < _number(row[7]) < 3  # first loss: epsilon MSE of an untrained model
    reference = rows["diffusers LoRA (PyTorch, peft)"]
    assert _number(reference[4]) == pytest.approx(
        _number(rows["sdjax LoRA"][1]) / _number(reference[1]), rel=0.02)
    if full_finetune:
        saved = float(re.search(r"\): (-?[0-9]+) MiB less", stdout).group(1))
        full, lora = _number(rows["sdjax full fine-tune"][6]), _number(rows["sdjax LoRA"][6])
        assert saved == pytest.approx(full - lora, abs=1)


@pytest.mark.slow  # the tiny benchmark still takes 25-40 s
def test_controlnet_step_agrees_with_diffusers_and_the_sweep_traces_once(tmp_path):
    stdout = _run("controlnet", "--sizes=8", "--repeats=1", "--matmul=128",
                  f"--workdir={tmp_path}", tmp_path=tmp_path)
    assert "matmul ceiling" in stdout and "load average" in stdout, stdout
    step = {r[1]: r for r in _rows(stdout, "8x8")}
    assert set(step) == {"sdjax", "diffusers (PyTorch)"}, stdout
    ours, reference = step["sdjax"], step["diffusers (PyTorch)"]
    assert _number(ours[6]) > 0  # the matmul ceiling read in the same loop
    assert _number(reference[4]) == pytest.approx(_number(ours[2]) / _number(reference[2]),
                                                  rel=0.02)
    # Same weights, same inputs: the U-Net's output and the residuals agree, and the ControlNet
    # moves that output (its zero layers were drawn at random), so the agreement covers it.
    assert _number(reference[9]) < 1e-4 and _number(reference[10]) < 1e-4
    effect = float(re.search(r"moves the U-Net's output by ([0-9.e+-]+)", stdout).group(1))
    assert effect > 0.05, stdout
    # The sweep: 7 scales and 5 start/end windows through one Generator, traced once; every
    # setting but the first changes the drawing.
    sweep = [r for r in _rows(stdout, "") if len(r) == 7 and re.fullmatch(r"[0-9.]+", r[0])]
    assert len(sweep) == 12, stdout
    assert [r[4] for r in sweep] == ["1"] * 12
    assert sweep[0][6].startswith("first call") and all(_number(r[3]) > 0 for r in sweep)
    assert all(_number(r[5]) > 1e-3 for r in sweep[1:]), stdout
    assert "program traces: 1 after the first call, 1 after all 12" in stdout


def test_flow_transformers_print_both_sides_ratio_and_agreement_for_sd3_and_flux(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.flow_transformers", "--tiny",
                          "--repeats=1", "--matmul=128", "--flux_double=1", "--flux_single=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-4000:]
    stdout = out.stdout
    assert "matmul ceiling" in stdout and "1 double + 1 single blocks" in stdout, stdout
    for model in ("sd3", "flux"):
        rows = {r[1]: r for r in _rows(stdout, model)}
        assert set(rows) == {"sdjax", "diffusers (PyTorch)"}, stdout
        ours, reference = rows["sdjax"], rows["diffusers (PyTorch)"]
        assert _number(ours[5]) > 0 and _number(ours[6]) > 0  # XLA's GFLOP, achieved GFLOP/s
        assert _number(ours[7]) > 0  # the matmul ceiling read in the same loop
        # sdjax / PyTorch: the ratio of the two medians in the same run.
        assert _number(reference[4]) == pytest.approx(_number(ours[2]) / _number(reference[2]),
                                                      rel=0.02)
        # Same weights (copied by the public converter), same inputs: the outputs agree.
        assert _number(reference[10]) < 1e-4, stdout
        assert re.search(rf"{model}: sdjax / diffusers = [0-9.e+-]+ .*outputs agree to "
                         rf"[0-9.e+-]+ \(relative\)", stdout), stdout
