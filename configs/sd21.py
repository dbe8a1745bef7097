"""Stable Diffusion 2.x (768 px v-prediction; OpenCLIP ViT-H/14 text encoder).

    python -m experiments.generate --config=configs/sd21.py --model=/path/to/sd21.safetensors \
        --config.prediction_type=v_prediction --prompt="a photo of a cat"

`:base` is the 512 px epsilon model (stable-diffusion-2-1-base).
"""
from configs.common import generation_config


def get_config(arg=None):
    if arg == "base":
        config = generation_config(height=512, width=512)
    elif arg in (None, ""):
        config = generation_config(height=768, width=768)
    else:
        raise ValueError(f"configs/sd21.py: unknown variant {arg!r} (known: base)")
    config.lock()
    return config
