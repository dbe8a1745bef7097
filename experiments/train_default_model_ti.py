"""Learn the embedded default model's textual-inversion token `xmark` (sdjax/assets/default_model/
embeddings/) from scratch and ship it: 50 training images from `default_model_ti.mark_examples` ->
textual-inversion training (configs/default_model_ti.py) -> the WebUI-format file -> evaluation
with the judge -> the folder's files (sdjax/evaluation/default_model_ti.py describes each figure).

    python -m experiments.train_default_model_ti --workdir=/tmp/sdjax_xmark

Training checkpoints into --workdir and resumes there. `--evaluate` only re-measures the embedding
already at --out.
"""
from __future__ import annotations

import pathlib

from absl import app, flags

from sdjax import cli

ROOT = pathlib.Path(__file__).absolute().parent.parent

cli.define_config_file("config", "configs/default_model_ti.py", "textual-inversion config")
flags.DEFINE_string("workdir", "/tmp/sdjax_xmark", "training images and checkpoints")
flags.DEFINE_string("out", str(ROOT / "sdjax" / "assets" / "default_model" / "embeddings"),
                    "where the embedding, its evaluation and README go")
flags.DEFINE_bool("evaluate", False, "only evaluate the embedding file already in --out")
flags.DEFINE_bool("progress", False, "progress bar")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from configs import shapes
    from sdjax.evaluation import default_model_ti

    generation = shapes.get_config()
    config = FLAGS.config
    if FLAGS.evaluate:
        embedding = pathlib.Path(FLAGS.out) / (config.textual_inversion.token + ".safetensors")
        results = default_model_ti.evaluate_embedding(generation, str(embedding),
                                                      config.textual_inversion.init_word)
        print(default_model_ti.format_embedding_results(results))
        return
    record = default_model_ti.build_embedding(config, generation, FLAGS.workdir, FLAGS.out,
                                              progress=FLAGS.progress)
    print(default_model_ti.format_embedding_results(record["evaluation"]))
    print(f"{record['total_seconds']:.0f} s in all; written to {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
