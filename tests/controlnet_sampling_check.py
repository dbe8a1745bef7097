"""Run by tests/test_controlnet_sampling.py in a fresh process with 8 simulated CPU devices: a
ControlNet on `random_pretrained("tiny")` draws the same images on 1 device, on 8 under jit and
pmap, and with fsdp=2, and a new scale or start/end retraces nothing. Prints one JSON line."""
import json

import numpy as np


def random_controlnet(model, seed: int):
    """`controlnet_from_unet` with its zero convs and conditioning embedding's last conv made
    random (zero ones would leave every image as it was)."""
    import jax

    from sdjax.weights.controlnet import controlnet_from_unet

    factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
    widths = tuple(8 * 2 ** i for i in range(int(np.log2(factor)) + 1))
    weights = controlnet_from_unet(model.unet_config, model.params["unet"], seed=seed,
                                   conditioning_embedding_out_channels=widths)
    rng = np.random.default_rng(seed)

    def randomise(path, leaf):
        names = [p.key for p in path]
        zero_init = names[0] in ("controlnet_mid_block", "controlnet_cond_embedding") and (
            names[0] == "controlnet_mid_block" or names[1] == "conv_out") or \
            names[0].startswith("controlnet_down_blocks")
        if zero_init and names[-1] == "kernel":
            return (rng.standard_normal(leaf.shape) * 0.05).astype(leaf.dtype)
        return leaf

    weights.params = jax.tree_util.tree_map_with_path(randomise, weights.params)
    return weights


def main():
    import jax

    from sdjax import parallel
    from sdjax.sampling import Generator, Request, SamplingSpec
    from sdjax.sampling.controls import Control
    from sdjax.weights.presets import random_pretrained

    assert jax.device_count() == 8, jax.devices()
    model = random_pretrained("tiny", seed=1)
    controlnet = random_controlnet(model, 3)
    spec = SamplingSpec(sampler="euler_a", steps=3, height=32, width=32)
    image = np.kron(np.random.default_rng(0).random((4, 4, 3)), np.ones((8, 8, 1))).astype(np.float32)

    def request(scale, start=0.0, end=1.0, controls=True):
        control = [Control(controlnet, image, scale=scale, start=start, end=end)] if controls else []
        return Request(prompt="a red circle", negative_prompt="blue", seed=11, num_images=8,
                       cfg_scale=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], controls=control)

    one_device = Generator(model, mesh=parallel.make_mesh(devices=jax.devices()[:1]),
                           exported_programs=False)
    scales = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    reference = one_device(request(scales), spec)["images"]
    base = one_device(request(1.0, controls=False), spec)["images"]
    drawn, retraced = {}, {}
    for name, options in {"jit8": {}, "pmap8": {"parallel_mode": "pmap"}, "fsdp2": {"fsdp": 2}}.items():
        generator = Generator(model, exported_programs=False, **options)
        drawn[name] = generator(request(scales), spec)["images"]
        traces = generator.traces
        generator(request(0.7, start=0.34, end=0.9), spec)
        retraced[name] = generator.traces - traces
    print(json.dumps({
        "control_changes_images": float(np.abs(reference[1:] - base[1:]).max()),
        "scale_zero_max_abs_diff": float(np.abs(reference[0] - base[0]).max()),
        "bit_identical": {k: bool(np.array_equal(v, reference)) for k, v in drawn.items()},
        "max_abs_diff": {k: float(np.abs(v - reference).max()) for k, v in drawn.items()},
        "traces_after_scale_change": retraced,
    }))


if __name__ == "__main__":
    main()
