"""Plain helpers the tests share, importable by the scripts they run in subprocesses too
(`from tests.helpers import make_state`); fixtures live in conftest.py. Heavy libraries are imported
where they are used, so a test that needs none of them does not pay for them."""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Callable, Iterable, Optional

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- subprocesses ---------------------------------------------------------------------------------

def run_python(*args: str, devices: Optional[int] = None, timeout: float = 600
               ) -> subprocess.CompletedProcess:
    """`python *args` in the repository root, output captured; with `devices`, on that many
    simulated CPU devices (a fresh process: XLA reads the flag once)."""
    env = dict(os.environ)
    if devices is not None:
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def json_result(result: subprocess.CompletedProcess) -> dict:
    """The JSON object a check script prints as its last line, once it has exited cleanly."""
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- train states ---------------------------------------------------------------------------------

def make_state(seed: int):
    """A train state with one leaf large enough (>= parallel.FSDP_MIN_SIZE) to be split over fsdp,
    a frozen model, EMA, and moments and EMA different from the params, as after some steps."""
    import jax

    from sdjax.training import state as state_lib

    rng = np.random.default_rng(seed)
    params = {"unet": {"big": rng.standard_normal((256, 512), dtype=np.float32),
                       "bias": rng.standard_normal((8,), dtype=np.float32)},
              "vae": {"w": rng.standard_normal((4, 4), dtype=np.float32)}}
    optimizer = state_lib.make_optimizer({"unet": {"lr": 1e-3}, "vae": {"frozen": True}}, 10)
    state = state_lib.init_train_state(params, optimizer, jax.random.key(seed), use_ema=True)
    grads = jax.tree.map(lambda x: np.full(x.shape, 0.1, np.float32), params)
    return state.apply_gradients(grads)


# --- arrays and params ----------------------------------------------------------------------------

def take(stream: Iterable, n: int) -> list:
    """The next `n` items of `stream`; a stream that ends sooner fails the test."""
    items = list(itertools.islice(stream, n))
    assert len(items) == n, f"the stream ended after {len(items)} of {n} items"
    return items


def to_nchw(x, dtype=None):
    """A numpy NHWC batch as the torch NCHW tensor the references take."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype).transpose(0, 3, 1, 2)))


def to_nhwc(t) -> np.ndarray:
    """A torch NCHW tensor as a numpy NHWC batch."""
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def flat_params(tree) -> dict[str, np.ndarray]:
    """Leaves by path (`['unet']['conv_in']['kernel']`), as numpy arrays."""
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --- checkpoint folders ---------------------------------------------------------------------------

def rewritten_folder(src, dst, weights: str, edit: Optional[Callable[[dict], object]] = None,
                     *, save_as: Optional[str] = None) -> str:
    """A copy of the model folder `src` (its config.json) at `dst` whose weights file holds the
    tensors of `src/weights` after `edit` changed that dict in place; written as `save_as`
    (default `weights`). Returns the path of the written weights file."""
    from safetensors.numpy import load_file, save_file

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / weights))
    if edit is not None:
        edit(tensors)
    path = dst / (save_as or weights)
    save_file(tensors, str(path))
    return str(path)
