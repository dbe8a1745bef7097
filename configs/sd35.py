"""Stable Diffusion 3.5 (MMDiT, CLIP-L + CLIP-G + T5-XXL, flow matching), 1024 px.

    python -m experiments.generate --config=configs/sd35.py --model=/path/to/stable-diffusion-3.5-large \
        --prompt="a photo of a cat holding a sign that says hello"
    python -m experiments.generate --config=configs/sd35.py:medium \
        --model=/path/to/sd3.5_medium.safetensors --components=/path/to/stable-diffusion-3.5-medium

Variants: `large` (default: 28 steps, CFG 3.5, as diffusers' model card), `medium` (40 steps,
CFG 4.5, skip-layer guidance on blocks 7-9 as Stability recommends), `large_turbo` (4 steps, no
CFG), `tiny` (the random-weight tiny SD3 model: runs in a minute on a CPU).
"""
from configs.common import generation_config

VARIANTS = {
    "large": dict(steps=28, cfg_scale=3.5),
    "medium": dict(steps=40, cfg_scale=4.5, slg_layers=(7, 8, 9)),
    "large_turbo": dict(steps=4, cfg_scale=1.0),
    "tiny": dict(steps=8, cfg_scale=3.5, size=64, model="random:tiny_sd3"),
}


def get_config(arg=None):
    name = arg or "large"
    if name not in VARIANTS:
        raise ValueError(f"configs/sd35.py: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    size = variant.get("size", 1024)
    config = generation_config(height=size, width=size, cfg_scale=variant["cfg_scale"],
                               steps=variant["steps"], sampler="flow_euler",
                               model=variant.get("model", ""))
    config.slg_layers = variant.get("slg_layers", ())
    config.lock()
    return config
