"""A LoRA for Stable Diffusion 1.5 as kohya's sd-scripts trains one (train_network.py,
networks.lora: rank 32, alpha 16, U-Net at 1e-4, text encoder at 5e-5, constant schedule), on
configs/train_sd15.py's setting (512 px, bfloat16 with gradient checkpointing, min-SNR 5).

    python -m experiments.train --config=configs/train_lora_sd15.py --workdir=/tmp/sd15_lora \
        --config.init_from=/path/to/stable-diffusion-v1-5 --config.data.folder=/path/to/data

It writes `export/lora.safetensors` (kohya's format, with its `ss_*` metadata) and
`export/lora.sdjax.safetensors`, and the same under `exports/step_N/` every 500 steps. Variants,
comma-separated: `:locon` (conv_dim 8, conv_alpha 4 on the resnets' and samplers' convs),
`:unet_only` (kohya's --network_train_unet_only). Multi-host: add --coordinator_address=HOST:PORT
--num_processes=N --process_id=i on every host.
"""
from configs import train_lora_tiny, train_sd15


def get_config(arg=None):
    c = train_lora_tiny.with_lora(train_sd15.get_config(), arg)
    c.total_steps = 2000
    c.data.batch_size = 4
    c.lora.network_dim = 32
    c.lora.network_alpha = 16.0
    if c.lora.conv_dim:
        c.lora.conv_dim = 8
        c.lora.conv_alpha = 4.0
    c.optimizer.groups.lora_unet.lr = 1e-4
    c.optimizer.groups.lora_text_encoder.lr = 5e-5
    c.checkpoint.every = 500
    c.checkpoint.export_every = 500
    c.sample.every = 500
    return c
