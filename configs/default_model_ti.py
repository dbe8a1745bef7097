"""A textual-inversion token for the embedded default model (sdjax/assets/default_model): `xmark`,
learned from 50 rendered images to mean a small red cross, an object the model draws but has no
one word for. diffusers' recipe (the model frozen, the new token's vectors trained, each starting
as the embedding of `init_word`) on `default_model_ti.mark_examples`, captioned with the token in
place of the object. One command writes the images, trains, exports, evaluates and writes the
shipped files (sdjax/assets/default_model/embeddings/):

    python -m experiments.train_default_model_ti --workdir=/tmp/sdjax_xmark

or the training alone, on a folder `write_shapes_folder(..., examples=mark_examples)` wrote:

    python -m experiments.train --config=configs/default_model_ti.py --workdir=/tmp/xmark \
        --config.data.folder=/tmp/xmark_data
"""
import ml_collections

from configs import train_tiny
from sdjax import DEFAULT_MODEL


def get_config(arg=None):
    c = train_tiny.with_textual_inversion(train_tiny.get_config())
    c.seed = 7
    c.init_from = DEFAULT_MODEL
    c.total_steps = int(arg) if arg else 300
    c.log_every = 25
    c.data.batch_size = 16
    c.data.num_workers = 2
    # Three vectors, as many as "small red cross" takes words, so the words themselves are one
    # solution; all start as "cross", the one-token word nearest the meaning.
    c.textual_inversion.token = "xmark"
    c.textual_inversion.num_vectors = 3
    c.textual_inversion.init_word = "cross"
    c.optimizer.groups.embeddings.lr = 5e-3
    # As the default model was trained: min-SNR-5 and offset noise.
    c.ldm.snr_gamma = 5.0
    c.ldm.offset_noise = 0.05
    c.checkpoint.every = 100
    c.checkpoint.keep = 1

    with c.unlocked():
        # The training images: `examples` ("package.module:function", f(seed, image_size) -> an
        # endless stream of shapes.Example) written as a folder of num_examples by
        # experiments/train_default_model_ti.py, which fills in data.folder.
        c.shapes_data = ml_collections.ConfigDict()
        c.shapes_data.examples = "sdjax.evaluation.default_model_ti:mark_examples"
        c.shapes_data.num_examples = 50
        c.shapes_data.seed = 8
    return c
