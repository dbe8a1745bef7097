"""FLUX.1 [dev] (guidance-distilled Flux transformer, CLIP-L + T5-XXL, flow matching with the
resolution-dependent shift), 1024 px.

    python -m experiments.generate --config=configs/flux_dev.py --model=/path/to/FLUX.1-dev \
        --prompt="a photo of a cat holding a sign that says hello"
    python -m experiments.generate --config=configs/flux_dev.py \
        --model=/path/to/flux1-dev.safetensors --components=/path/to/FLUX.1-dev

The guidance scale is an input of the model (`embedded_guidance`, 3.5 as diffusers' default), not
classifier-free guidance: `cfg_scale` stays 1 (set it above 1 with a negative prompt for true
CFG on top). Variant `tiny`: the random-weight tiny Flux model.
"""
from configs.common import generation_config


def get_config(arg=None):
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"configs/flux_dev.py: unknown variant {arg!r}; known: tiny")
    size = 64 if tiny else 1024
    config = generation_config(height=size, width=size, cfg_scale=1.0, steps=8 if tiny else 28,
                               sampler="flow_euler", model="random:tiny_flux" if tiny else "")
    config.embedded_guidance = 3.5
    config.max_sequence_length = 512
    config.lock()
    return config
