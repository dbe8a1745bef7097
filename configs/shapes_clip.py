"""Stage 1 of the embedded default model: a tiny CLIP trained contrastively on the shapes world.
Its text tower becomes the diffusion model's text encoder, so its shape must match the `shapes`
preset's text_encoder (sdjax/presets.py). Run by experiments/build_default_model.py, or alone:

    python -m experiments.train --config=configs/shapes_clip.py --workdir=/tmp/shapes/clip \
        --config.data.folder=/tmp/shapes/data
"""
import ml_collections

from configs import train_tiny


def get_config(arg=None):
    c = train_tiny.get_config("clip")
    c.seed = 0
    c.total_steps = int(arg) if arg else 1500
    c.log_every = 25
    c.clip.hidden_size = 64
    c.clip.layers = 3
    c.clip.heads = 4
    c.clip.projection_dim = 64
    c.clip.patch_size = 4        # 8x8 patches of a 32 px image
    # What --config.clip.hard_negatives=K draws: captions changed in one attribute.
    c.clip.hard_negative_captions = "sdjax.data.shapes:hard_negative_captions"
    c.data.batch_size = 128      # contrastive: negatives come from the batch
    c.data.num_workers = 2
    c.optimizer.groups = ml_collections.ConfigDict({
        "clip": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 50, "weight_decay": 0.0,
                "frozen": False}})
    c.ema.decay = 0.99
    c.checkpoint.every = 200
    c.checkpoint.keep = 1
    return c
