"""LoRAs built in memory on the layers of `random_pretrained("tiny")` (what
tests/test_lora_sampling.py draws with), and, run by that test in a fresh process with 8 simulated
CPU devices, a check that prints one JSON line comparing LoRA images across parallel layouts and
the two adapter modes."""
import json

import numpy as np

# The layers a test LoRA adapts: cross- and self-attention, a 3x3 conv (LoCon), a full LyCORIS-style
# delta on the tiny U-Net's largest conv (73,728 elements: split over fsdp like a large param), and
# the text encoder's first attention.
CONV_DELTA = "up_blocks_0/resnets_0/conv1"


def random_lora(name: str, seed: int, *, text_encoder: bool = True, unet: bool = True):
    """An `adapters.network.Adapter` of random factors on the tiny model (float32)."""
    from sdjax.adapters.network import Adapter, DenseDelta, LowRank

    rng = np.random.default_rng(seed)

    def low_rank(shape_in, shape_out, rank, std, alpha):
        return LowRank(rng.normal(0, std, shape_in + (rank,)).astype(np.float32),
                       rng.normal(0, std, (rank, shape_out)).astype(np.float32), alpha)

    modules = {}
    if unet:
        modules["unet"] = {
            "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k":
                low_rank((32,), 32, 4, 0.3, 4.0),
            "mid_block/attentions_0/transformer_blocks_0/attn1/to_q":
                low_rank((64,), 64, 4, 0.3, 2.0),
            "down_blocks_0/resnets_0/conv1": low_rank((3, 3, 32), 32, 2, 0.1, 1.0),
            CONV_DELTA: DenseDelta(rng.normal(0, 0.02, (3, 3, 128, 64)).astype(np.float32)),
        }
    if text_encoder:
        modules["text_encoder"] = {
            "layers_0/self_attn/q_proj": low_rank((32,), 32, 2, 0.7, 2.0),
            "layers_1/mlp/fc1": low_rank((32,), 64, 2, 0.5, 2.0),
        }
    return Adapter(name, modules, source="")


def main():
    import jax

    from sdjax import parallel
    from sdjax.adapters.network import Weighted
    from sdjax.sampling import Generator, Request, SamplingSpec
    from sdjax.weights.presets import random_pretrained

    assert jax.device_count() == 8, jax.devices()
    model = random_pretrained("tiny", seed=1)
    lora = random_lora("a", 0)
    spec = SamplingSpec(sampler="euler_a", steps=3, height=32, width=32)

    def request(unet, te):
        return Request(prompt="a red circle on the left", negative_prompt="blue", seed=11,
                       num_images=8, cfg_scale=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                       guidance_rescale=0.5, adapters=[Weighted(lora, unet, te)])

    one_device = Generator(model, mesh=parallel.make_mesh(devices=jax.devices()[:1]),
                           exported_programs=False)
    reference = one_device(request(0.8, 0.6), spec)["images"]
    base = one_device(Request(prompt="a red circle on the left", negative_prompt="blue", seed=11,
                              num_images=8, cfg_scale=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                              guidance_rescale=0.5), spec)["images"]
    runtime, merged, retraced = {}, {}, {}
    layouts = {"jit8": {}, "pmap8": {"parallel_mode": "pmap"}, "fsdp2": {"fsdp": 2}}
    delta_sharding = None
    for name, options in layouts.items():
        generator = Generator(model, exported_programs=False, **options)
        runtime[name] = generator(request(0.8, 0.6), spec)["images"]
        traces = generator.traces
        generator(request(0.3, 1.0), spec)
        retraced[name] = generator.traces - traces
        if name == "fsdp2":
            params = generator.params_for((Weighted(lora, 0.8, 0.6),))
            leaf = params["adapters"]["unet"]["up_blocks_0"]["resnets_0"]["conv1"]["delta"]
            delta_sharding = str(leaf.sharding.spec)
        else:
            merged[name] = Generator(model, exported_programs=False, adapter_mode="merged",
                                     **options)(request(0.8, 0.6), spec)["images"]
    print(json.dumps({
        "lora_changes_images": float(np.abs(reference - base).max()),
        "runtime_bit_identical": {k: bool(np.array_equal(v, reference)) for k, v in runtime.items()},
        "runtime_max_abs_diff": {k: float(np.abs(v - reference).max()) for k, v in runtime.items()},
        "merged_max_abs_diff": {k: float(np.abs(v - runtime[k]).max()) for k, v in merged.items()},
        "traces_after_weight_change": retraced,
        "fsdp_delta_sharding": delta_sharding,
    }))


if __name__ == "__main__":
    main()
