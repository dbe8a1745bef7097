"""A LoRA that teaches the embedded default model (sdjax/assets/default_model) a shape it has never
seen: a heart (`sdjax.data.shapes.EXTRA_SHAPES`), drawn by the shapes world's own code. kohya's
recipe (U-Net transformer blocks and their resnets' convs, LoCon, and the text encoder, the model
frozen) on `shapes.lora_examples`: half heart scenes, half ordinary ones to keep the rest of the
model as it was. One command trains, exports, evaluates and writes the shipped files
(sdjax/assets/default_model/loras/):

    python -m experiments.train_default_model_lora --workdir=/tmp/sdjax_heart_lora

or the training alone, on a folder `write_shapes_folder(..., examples=shapes.lora_examples)` wrote:

    python -m experiments.train --config=configs/default_model_lora.py --workdir=/tmp/heart \
        --config.data.folder=/tmp/heart_data
"""
import ml_collections

from configs import train_lora_tiny
from sdjax import DEFAULT_MODEL


def get_config(arg=None):
    c = train_lora_tiny.get_config("locon")
    c.seed = 4
    c.init_from = DEFAULT_MODEL
    c.total_steps = int(arg) if arg else 600
    c.log_every = 25
    c.data.batch_size = 16
    c.data.num_workers = 2
    c.lora.output_name = "heart"
    # The transformer blocks' cross-attention (where the prompt enters) and feed-forward layers,
    # and the text encoder's attention and MLP, at rank 4; LoCon on the resnets of the 16x16 latent
    # level, which have no attention and draw the finest detail (a heart's notch and point). The
    # rest of kohya's targets (self-attention, projections, the wider levels' convs) would more
    # than double the file for no better hearts.
    c.lora.network_dim = 4
    c.lora.network_alpha = 4.0
    c.lora.conv_dim = 8
    c.lora.conv_alpha = 8.0
    c.lora.target_modules = (r"(^|\.)attentions\.\d+\.transformer_blocks\.\d+\.(attn2|ff)\.",
                             r"^(down_blocks\.0|up_blocks\.2)\.resnets\.\d+\.",
                             r"^text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.")
    c.optimizer.groups.lora_unet.lr = 5e-3
    c.optimizer.groups.lora_unet.schedule = "cosine"
    c.optimizer.groups.lora_unet.warmup_steps = 30
    c.optimizer.groups.lora_text_encoder.lr = 1.5e-3
    c.optimizer.groups.lora_text_encoder.schedule = "cosine"
    c.optimizer.groups.lora_text_encoder.warmup_steps = 30
    # As the default model was trained: min-SNR-5, offset noise, and empty captions one time in
    # ten, so the unconditional prediction that guidance subtracts moves with the LoRA.
    c.ldm.snr_gamma = 5.0
    c.ldm.offset_noise = 0.05
    c.ldm.caption_dropout = 0.1
    c.checkpoint.every = 200
    c.checkpoint.keep = 1

    with c.unlocked():
        # The training images: `examples` ("package.module:function", f(seed, image_size) -> an
        # endless stream of shapes.Example) written as a folder of num_examples by
        # experiments/train_default_model_lora.py, which fills in data.folder.
        c.shapes_data = ml_collections.ConfigDict()
        c.shapes_data.examples = "sdjax.data.shapes:lora_examples"
        c.shapes_data.num_examples = 12_000
        c.shapes_data.seed = 5
    return c
