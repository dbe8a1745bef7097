"""The shapes-world SD3 of the flow guidance study (docs/flow.md, "A guidance study"): a small MMDiT
(sdjax/evaluation/flow_study.py) trained with the rectified-flow objective on the embedded default
model's frozen VAE and text encoder.

    python -c "from sdjax.evaluation.flow_study import write_start_model; write_start_model('/tmp/shapes_sd3_start')"
    python -c "from sdjax.data.shapes_dataset import write_shapes_folder; write_shapes_folder('/tmp/shapes_data', 12000)"
    python -m experiments.train --config=configs/train_flow_shapes.py --workdir=/tmp/shapes_sd3 \
        --config.init_from=/tmp/shapes_sd3_start --config.data.folder=/tmp/shapes_data
"""
from configs import train_flow_tiny


def get_config(arg=None):
    c = train_flow_tiny.get_config("sd3")
    c.init_from = "/tmp/shapes_sd3_start"
    c.total_steps = int(arg) if arg else 3000
    c.log_every = 50
    c.data.batch_size = 32
    c.data.random_flip = False  # captions name left and right
    c.optimizer.groups.transformer.lr = 1e-3
    c.optimizer.groups.transformer.schedule = "cosine"
    c.optimizer.groups.transformer.warmup_steps = 100
    c.flow.caption_dropout = 0.1  # the empty caption, for classifier-free guidance
    c.flow.max_sequence_length = 1  # no T5: one zero token (flow_study.MAX_SEQUENCE_LENGTH)
    c.checkpoint.every = 500
    c.checkpoint.keep = 1
    c.sample.every = 1000
    return c
