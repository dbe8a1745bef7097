"""Seeds mean the same everywhere: 1 device, 8 devices (jit, pmap, fsdp) and eight batches of one
give bit-identical images. Runs in a subprocess with 8 simulated CPU devices."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_images_are_bit_identical_across_devices_modes_and_batching(sampler):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "tests.parallel_sampling_check", sampler],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["distinct_images"]
    assert all(result["bit_identical"].values()), result["max_abs_diff"]
