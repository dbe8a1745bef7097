"""Fine-tune Stable Diffusion 1.5 on an image-caption folder (512 px, U-Net trained, text encoder
frozen, VAE frozen), as diffusers' train_text_to_image.py does by default.

    python -m experiments.train --config=configs/train_sd15.py --workdir=/tmp/sd15_ft \
        --config.init_from=/path/to/stable-diffusion-v1-5 --config.data.folder=/path/to/data

Variant `:text` also trains the text encoder at its own, lower learning rate. Multi-host: add
--coordinator_address=HOST:PORT --num_processes=N --process_id=i on every host.
"""
from configs import train_tiny


def get_config(arg=None):
    c = train_tiny.get_config()
    with c.unlocked():
        c.init_from = ""             # required: diffusers folder, .safetensors or sdjax folder
        c.total_steps = 15000
        c.compute_dtype = "bfloat16"
        c.remat = True
        c.log_every = 50
        c.data.resolution = 512
        c.data.batch_size = 16
        c.data.random_flip = True
        c.data.num_workers = 8
        c.data.prefetch = 4
        c.optimizer.grad_clip_norm = 1.0
        c.optimizer.accumulate_steps = 1
        c.optimizer.groups = {
            "unet": {"lr": 1e-5, "schedule": "constant", "warmup_steps": 500,
                     "weight_decay": 1e-2, "frozen": False}}
        if arg == "text":
            c.optimizer.groups["text_encoder"] = {"lr": 5e-6, "schedule": "constant",
                                                  "warmup_steps": 500, "weight_decay": 1e-2,
                                                  "frozen": False}
        c.ema.decay = 0.9999
        c.ldm.snr_gamma = 5.0
        c.ldm.caption_dropout = 0.1
        c.checkpoint.every = 1000
        c.checkpoint.keep = 3
        c.checkpoint.export_every = 5000
        c.sample.every = 1000
        c.sample.prompts = ("a photo of a cat", "a watercolor painting of a lighthouse")
        c.sample.sampler = "dpmpp_2m"
        c.sample.steps = 25
        c.sample.cfg_scale = 7.5
    return c
