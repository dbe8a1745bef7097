"""Seeds mean the same everywhere: 1 device, 8 devices (jit, pmap, fsdp) and eight batches of one
give bit-identical images. Runs in a subprocess with 8 simulated CPU devices."""
import pytest

from tests.helpers import json_result, run_python


@pytest.mark.parametrize("sampler,preset", [
    ("dpmpp_2m", "tiny"), ("euler_a", "tiny"),
    # the flow families: SD3 (MMDiT) with a stochastic sampler, Flux with its embedded guidance
    pytest.param("flow_euler_a", "tiny_sd3", marks=pytest.mark.slow),
    pytest.param("flow_dpmpp_2m", "tiny_flux", marks=pytest.mark.slow)])
def test_images_are_bit_identical_across_devices_modes_and_batching(sampler, preset):
    result = json_result(run_python("-m", "tests.parallel_sampling_check", sampler, preset,
                                    devices=8, timeout=900))
    assert result["distinct_images"]
    assert all(result["bit_identical"].values()), result["max_abs_diff"]
