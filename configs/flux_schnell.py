"""FLUX.1 [schnell] (timestep-distilled Flux transformer: 4 steps, no guidance), 1024 px.

    python -m experiments.generate --config=configs/flux_schnell.py \
        --model=/path/to/FLUX.1-schnell --prompt="a photo of a cat"

schnell was trained with 256 T5 tokens and has no guidance embedding; its scheduler has no shift.
"""
from configs.common import generation_config


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"configs/flux_schnell.py: unknown variant {arg!r}")
    config = generation_config(height=1024, width=1024, cfg_scale=1.0, steps=4,
                               sampler="flow_euler")
    config.max_sequence_length = 256
    config.lock()
    return config
