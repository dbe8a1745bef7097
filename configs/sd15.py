"""Stable Diffusion 1.x (512 px, OpenAI CLIP ViT-L/14 text encoder).

    python -m experiments.generate --config=configs/sd15.py --model=/path/to/sd15 \
        --prompt="a photo of a cat" --config.sampler=dpmpp_2m --config.steps=25
"""
from configs.common import generation_config


def get_config(arg=None):
    config = generation_config(height=512, width=512)
    config.lock()
    return config
