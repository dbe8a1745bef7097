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
