"""Generation defaults of the embedded default model (sdjax/assets/default_model): its native
32 px size, sampler, steps and guidance. The default config of experiments/generate.py; an empty
`model` means the embedded model.

    python -m experiments.generate --prompt "a red circle on the left, blue background"
"""
from configs.common import generation_config


def get_config(arg=None):
    config = generation_config(height=32, width=32, model="", cfg_scale=4.0, steps=20,
                               sampler="dpmpp_2m",
                               # A 32 px image takes well under a second: no per-step bar, so a
                               # second launch loads the exported program instead of tracing.
                               progress=False)
    config.lock()
    return config
