"""Stable Diffusion XL base (1024 px; two text encoders, size conditioning).

    python -m experiments.generate --config=configs/sdxl.py --model=/path/to/sdxl.safetensors \
        --prompt="a photo of a cat" --config.cfg_scale=5
"""
from configs.common import generation_config


def get_config(arg=None):
    config = generation_config(height=1024, width=1024, cfg_scale=5.0, steps=30)
    config.lock()
    return config
