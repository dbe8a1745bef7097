"""A ControlNet on the tiny random model (or any checkpoint, `--config.init_from`), as diffusers'
examples/controlnet/train_controlnet.py trains one: the model frozen, the ControlNet copied from
its U-Net's encoder (zero convs at zero) at its own learning rate, half the captions dropped;
finishes on a laptop CPU in a minute or two.

    python -m experiments.train --config=configs/train_controlnet_tiny.py:shapes \
        --workdir=/tmp/sdjax_controlnet_tiny

It writes `export/controlnet/` (diffusers' `ControlNetModel.from_pretrained` reads it). Variants:
`:shapes` trains on 64 shapes-world scenes with their object masks as control images (written
into <workdir>/data), positions left out of half the captions' objects; `:edges` the same with
the masks' outlines. Without one, bring images and their conditioning images:

    python -m experiments.train --config=configs/train_controlnet_tiny.py --workdir=/tmp/cn \
        --config.data.folder=/path/to/images_with_txt --config.data.conditioning_dir=/path/to/conditioning
"""
from configs import train_tiny

VARIANTS = ("shapes", "edges")


def with_controlnet(c, arg=None):
    """Config `c` (a full fine-tune's) training a ControlNet instead, with `arg`'s variant."""
    if arg and arg not in VARIANTS:
        raise ValueError(f"ControlNet config: unknown variant {arg!r}; choose from {VARIANTS}")
    c.controlnet.use = True
    c.controlnet.learning_rate = 1e-3
    c.controlnet.caption_dropout = 0.5   # the original recipe's
    if arg:
        c.controlnet.shapes_control = "mask" if arg == "shapes" else "edges"
        c.controlnet.shapes_examples = 64
        c.controlnet.drop_position = 0.5
    with c.unlocked():
        c.optimizer.groups = {"controlnet": {"schedule": "constant", "warmup_steps": 0,
                                             "weight_decay": 0.0}}
    c.ema.use = False            # diffusers keeps no EMA of a ControlNet; the loop can
    c.ldm.caption_dropout = 0.0  # the ControlNet's own caption_dropout replaces it
    return c


def get_config(arg=None):
    return with_controlnet(train_tiny.get_config(), arg)
