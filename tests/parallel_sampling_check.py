"""Run by tests/test_parallel_sampling.py in a fresh process with 8 simulated CPU devices: prints
one JSON line comparing the images of every parallel layout with those of one device."""
import json
import sys

import jax
import numpy as np

from sdjax import parallel
from sdjax.weights.presets import random_pretrained
from sdjax.sampling import Generator, Request, SamplingSpec


def main():
    sampler = sys.argv[1]
    preset = sys.argv[2] if len(sys.argv) > 2 else "tiny"
    assert jax.device_count() == 8, jax.devices()
    model = random_pretrained(preset, seed=1)
    spec = SamplingSpec(sampler=sampler, steps=4, height=32, width=32,
                        max_sequence_length=16 if preset != "tiny" else 0)
    request = Request(prompt="a red circle on the left", negative_prompt="blue", seed=11,
                      num_images=8, cfg_scale=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                      embedded_guidance=3.0)
    one_device = Generator(model, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    reference = one_device(request, spec)["images"]
    results = {
        "jit8": Generator(model)(request, spec)["images"],
        "pmap8": Generator(model, parallel_mode="pmap")(request, spec)["images"],
        "fsdp2": Generator(model, fsdp=2)(request, spec)["images"],
    }
    singles = []
    for i in range(8):
        single = Request(prompt=request.prompt, negative_prompt=request.negative_prompt,
                         seed=request.seed + i, num_images=1, cfg_scale=request.cfg_scale[i],
                         embedded_guidance=3.0)
        singles.append(one_device(single, spec)["images"][0])
    results["eight_batches_of_one"] = np.stack(singles)
    print(json.dumps({
        "max_abs_diff": {k: float(np.abs(v - reference).max()) for k, v in results.items()},
        "bit_identical": {k: bool(np.array_equal(v, reference)) for k, v in results.items()},
        "distinct_images": bool(len({r.tobytes() for r in reference}) == 8),
    }))


if __name__ == "__main__":
    main()
