"""A LoRA on the tiny random model (or any checkpoint, `--config.init_from`), as kohya's
sd-scripts trains one: the model frozen, rank-4 factors on the U-Net's transformer blocks and the
text encoder, each at its own learning rate; finishes on a laptop CPU in a minute or two.

    python -m experiments.train --config=configs/train_lora_tiny.py --workdir=/tmp/sdjax_lora_tiny \
        --config.data.folder=/path/to/images_with_txt

It writes `export/lora.safetensors` (kohya's format: the WebUI, ComfyUI and diffusers'
`load_lora_weights` read it) and `export/lora.sdjax.safetensors`. Variants, comma-separated:
`:locon` also adapts the resnets' and samplers' convs (conv_dim 4), `:unet_only` leaves the text
encoder alone (kohya's --network_train_unet_only).
"""
from configs import train_tiny

VARIANTS = ("locon", "unet_only")


def with_lora(c, arg=None):
    """Config `c` (a full fine-tune's) training a LoRA instead, with `arg`'s variants."""
    variants = [v for v in (arg or "").split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"LoRA config: unknown variants {unknown}; choose from {VARIANTS}")
    c.lora.use = True
    c.lora.network_dim = 4
    c.lora.network_alpha = 1.0
    if "locon" in variants:
        c.lora.conv_dim = 4
        c.lora.conv_alpha = 1.0
    c.lora.train_text_encoder = "unet_only" not in variants
    with c.unlocked():
        # kohya's unet_lr and text_encoder_lr, each with its schedule.
        c.optimizer.groups = {
            "lora_unet": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
                          "weight_decay": 0.0, "frozen": False},
            "lora_text_encoder": {"lr": 5e-4, "schedule": "constant", "warmup_steps": 0,
                                  "weight_decay": 0.0, "frozen": False},
        }
    c.ema.use = False            # kohya keeps no EMA of a LoRA; the loop can (--config.ema.use)
    c.ldm.caption_dropout = 0.0
    return c


def get_config(arg=None):
    return with_lora(train_tiny.get_config(), arg)
