"""Stage 4 of the embedded default model: a short fine-tune of the stage-3 latent-diffusion model
(U-Net and text encoder) on captions written as people write prompts — sizes, positions or the
background left out, "on a blue background" as well as ", blue background"
(`sdjax.data.shapes.caption_variant`) — so that prompts need not spell out every attribute.
800 steps taught it the phrasings but not yet to place an object whose position the prompt leaves
out (see `heldout_written_accuracy` in the model's evaluation.json). `init_from` is the LDM stage's export. Run by experiments/build_default_model.py, or alone:

    python -m experiments.train --config=configs/shapes_ldm_captions.py \
        --workdir=/tmp/shapes/captions --config.data.folder=/tmp/shapes/data_captions \
        --config.init_from=/tmp/shapes/ldm/export
"""
from configs import shapes_ldm


def get_config(arg=None):
    c = shapes_ldm.get_config()
    c.seed = 3
    c.total_steps = int(arg) if arg else 800
    c.optimizer.groups.unet.lr = 2e-4
    c.optimizer.groups.unet.warmup_steps = 50
    c.optimizer.groups.text_encoder.lr = 5e-5
    c.optimizer.groups.text_encoder.warmup_steps = 50
    c.ema.decay = 0.99
    c.checkpoint.every = 200
    return c
