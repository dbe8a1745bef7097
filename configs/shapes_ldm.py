"""Stage 3 of the embedded default model: the latent-diffusion U-Net of the `shapes` preset on the
trained VAE (frozen) and the shapes CLIP's text tower (fine-tuned at its own, lower lr), with
caption dropout for classifier-free guidance. Every caption is rewritten as it is read in one of
the phrasings people write (`sdjax.data.shapes.prompt_phrasing`: sizes, positions or the background
left out, "on a blue background" or ", blue background", one or two objects), from the first step:
a model trained on full captions and fine-tuned on phrasings afterwards drew two-object prompts
without sizes right 0% of the time (docs/default_model.md). `init_from` is the folder
experiments/build_default_model.py assembles from the first two stages.

    python -m experiments.train --config=configs/shapes_ldm.py --workdir=/tmp/shapes/ldm \
        --config.data.folder=/tmp/shapes/data_ldm --config.init_from=/tmp/shapes/ldm_init
"""
from configs import train_tiny


def get_config(arg=None):
    c = train_tiny.get_config("ldm")
    c.seed = 2
    c.total_steps = int(arg) if arg else 4500
    c.log_every = 50
    c.data.batch_size = 64
    c.data.num_workers = 2
    c.data.caption_transform = "sdjax.data.shapes:prompt_phrasing"
    c.optimizer.groups.unet.lr = 1e-3
    c.optimizer.groups.unet.schedule = "cosine"
    c.optimizer.groups.unet.warmup_steps = 200
    c.optimizer.groups.text_encoder.lr = 1e-4
    c.optimizer.groups.text_encoder.schedule = "cosine"
    c.optimizer.groups.text_encoder.warmup_steps = 200
    c.ldm.caption_dropout = 0.1
    # min-SNR-5: down-weights the nearly clean timesteps, which converges faster
    c.ldm.snr_gamma = 5.0
    c.ldm.offset_noise = 0.05    # lets flat backgrounds reach their true mean colour
    c.ema.decay = 0.998
    c.checkpoint.every = 500
    c.checkpoint.keep = 1
    return c
