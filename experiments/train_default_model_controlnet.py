"""Train the embedded default model's ControlNet (sdjax/assets/controlnets/shapes_mask/) from scratch
and ship it: shapes-world images and their object masks -> ControlNet training
(configs/default_model_controlnet.py) -> diffusers folder -> evaluation with the judge -> the
folder's files (sdjax/evaluation/default_model_controlnet.py describes each figure).

    python -m experiments.train_default_model_controlnet --workdir=/tmp/sdjax_controlnet

Training checkpoints into --workdir and resumes there. `--evaluate` only re-measures the
ControlNet already at --out.
"""
from __future__ import annotations

import pathlib

from absl import app, flags

from sdjax import cli

ROOT = pathlib.Path(__file__).absolute().parent.parent

cli.define_config_file("config", "configs/default_model_controlnet.py", "ControlNet training config")
flags.DEFINE_string("workdir", "/tmp/sdjax_controlnet", "training data and checkpoints")
flags.DEFINE_string("out", str(ROOT / "sdjax" / "assets" / "controlnets" / "shapes_mask"),
                    "where the ControlNet, its evaluation and README go")
flags.DEFINE_integer("num_scenes", 40, "evaluation scenes (each drawn at the five positions)")
flags.DEFINE_bool("evaluate", False, "only evaluate the ControlNet already in --out")
flags.DEFINE_bool("progress", False, "progress bar")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from configs import shapes
    from sdjax.evaluation import default_model_controlnet as demo

    generation = shapes.get_config()
    if FLAGS.evaluate:
        results = demo.evaluate_controlnet(
            generation, str(pathlib.Path(FLAGS.out) / demo.SHIPPED_FOLDER),
            num_scenes=FLAGS.num_scenes)
        print(demo.format_controlnet_results(results))
        return
    record = demo.build_controlnet(FLAGS.config, generation, FLAGS.workdir, FLAGS.out,
                                   num_scenes=FLAGS.num_scenes, progress=FLAGS.progress)
    print(demo.format_controlnet_results(record["evaluation"]))
    print(f"{record['total_seconds']:.0f} s in all; written to {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
