"""Stage 2 of the embedded default model: the factor-2 KL autoencoder of the `shapes` preset,
trained on shapes-world images (32 px -> 16x16x4 latents). Run by
experiments/build_default_model.py, or alone:

    python -m experiments.train --config=configs/shapes_vae.py --workdir=/tmp/shapes/vae \
        --config.data.folder=/tmp/shapes/data
"""
import ml_collections

from configs import train_tiny


def get_config(arg=None):
    c = train_tiny.get_config("vae")
    c.seed = 1
    c.preset = "shapes"
    c.total_steps = int(arg) if arg else 1500
    c.log_every = 25
    c.data.batch_size = 32
    c.data.num_workers = 2
    c.optimizer.groups = ml_collections.ConfigDict({
        "vae": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 50, "weight_decay": 0.0,
                "frozen": False}})
    # L2 recovers flat colours exactly (what PSNR measures); a weak KL keeps the latents tame
    # without blurring edges.
    c.vae_loss.reconstruction = "l2"
    c.vae_loss.kl_weight = 1e-6
    c.ema.decay = 0.99
    c.checkpoint.every = 250
    c.checkpoint.keep = 1
    return c
