"""Stage 4 of the embedded default model: the diffusion stage (configs/shapes_ldm.py) continued
from its export with captions that name positions in 4 of 5 reads
(`sdjax.data.shapes:position_phrasing`) at a lower, again decaying lr. Trained on every phrasing
from the start, the diffusion stage learns "the first object is on the left or at the top" from
the captions that leave positions out before it learns which axis the position words name: its
named positions were 56-69% right when it ended, and still climbing (docs/default_model.md).
`init_from` is the diffusion stage's export.

    python -m experiments.train --config=configs/shapes_ldm_positions.py \
        --workdir=/tmp/shapes/ldm_positions --config.data.folder=/tmp/shapes/data_ldm \
        --config.init_from=/tmp/shapes/ldm/export
"""
from configs import shapes_ldm


def get_config(arg=None):
    c = shapes_ldm.get_config()
    c.seed = 3
    c.total_steps = int(arg) if arg else 2000
    c.data.caption_transform = "sdjax.data.shapes:position_phrasing"
    c.optimizer.groups.unet.lr = 4e-4
    c.optimizer.groups.unet.warmup_steps = 100
    c.optimizer.groups.text_encoder.lr = 4e-5
    c.optimizer.groups.text_encoder.warmup_steps = 100
    return c
