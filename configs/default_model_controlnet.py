"""A ControlNet for the embedded default model (sdjax/assets/default_model): it puts the object where
a mask says. Trained as diffusers' examples/controlnet trains one (the model frozen, the ControlNet
copied from its U-Net's encoder with zero convs at zero, half the captions dropped) on shapes-world
scenes whose control images are their objects' masks, drawn by the shapes world's own code
(`sdjax.data.shapes_control`); most captions leave the position out, since the mask shows it. One
command trains, exports, evaluates and writes the shipped folder (sdjax/assets/controlnets/):

    python -m experiments.train_default_model_controlnet --workdir=/tmp/sdjax_controlnet

or the training alone:

    python -m experiments.train --config=configs/default_model_controlnet.py --workdir=/tmp/cn
"""
from configs import train_controlnet_tiny, train_tiny
from sdjax import DEFAULT_MODEL


def get_config(arg=None):
    c = train_controlnet_tiny.with_controlnet(train_tiny.get_config(), "shapes")
    c.seed = 6
    c.init_from = DEFAULT_MODEL
    c.total_steps = int(arg) if arg else 4000
    c.log_every = 25
    c.data.batch_size = 16
    c.data.num_workers = 2
    c.controlnet.learning_rate = 1e-3
    # Far fewer empty captions than the original recipe's half: the ControlNet also reads the
    # prompt, and learns to bind its two colours to the mask and the rest, which the base model
    # confuses (at 0.3, 3000 steps: the mask's position 92%, the misses objects drawn in the
    # background's colour).
    c.controlnet.caption_dropout = 0.1
    c.controlnet.shapes_examples = 12_000
    # Prompts name the position or not, as users write them; the mask always shows it.
    c.controlnet.drop_position = 0.7
    c.optimizer.groups.controlnet.schedule = "cosine"
    c.optimizer.groups.controlnet.warmup_steps = 50
    # As the default model was trained: min-SNR-5 and offset noise.
    c.ldm.snr_gamma = 5.0
    c.ldm.offset_noise = 0.05
    c.checkpoint.every = 200
    c.checkpoint.keep = 1
    return c
