"""Train the embedded default model's heart LoRA (sdjax/assets/default_model/loras/) from scratch and
ship it: training images from `shapes.lora_examples` -> LoRA training (configs/default_model_lora.py)
-> kohya file -> evaluation with the judge -> the folder's files (sdjax/evaluation/default_model_lora.py
describes each figure).

    python -m experiments.train_default_model_lora --workdir=/tmp/sdjax_heart_lora

Training checkpoints into --workdir and resumes there. `--evaluate` only re-measures the LoRA
file already at --out.
"""
from __future__ import annotations

import pathlib

from absl import app, flags

from sdjax import cli

ROOT = pathlib.Path(__file__).absolute().parent.parent

cli.define_config_file("config", "configs/default_model_lora.py", "LoRA training config")
flags.DEFINE_string("workdir", "/tmp/sdjax_heart_lora", "training images and checkpoints")
flags.DEFINE_string("out", str(ROOT / "sdjax" / "assets" / "default_model" / "loras"),
                    "where the LoRA, its evaluation and README go")
flags.DEFINE_integer("num_eval_prompts", 0, "prompts per evaluation set (0 = all)")
flags.DEFINE_bool("evaluate", False, "only evaluate the LoRA file already in --out")
flags.DEFINE_bool("progress", False, "progress bar")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from configs import shapes
    from sdjax.evaluation import default_model_lora

    generation = shapes.get_config()
    if FLAGS.evaluate:
        config = FLAGS.config
        lora = pathlib.Path(FLAGS.out) / (config.lora.output_name + ".safetensors")
        results = default_model_lora.evaluate_lora(generation, str(lora),
                                                   num_prompts=FLAGS.num_eval_prompts)
        print(default_model_lora.format_lora_results(results))
        return
    record = default_model_lora.build_lora(FLAGS.config, generation, FLAGS.workdir, FLAGS.out,
                                           num_eval_prompts=FLAGS.num_eval_prompts,
                                           progress=FLAGS.progress)
    print(default_model_lora.format_lora_results(record["evaluation"]))
    print(f"{record['total_seconds']:.0f} s in all; written to {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
