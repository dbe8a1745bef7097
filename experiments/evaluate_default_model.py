"""Evaluate the embedded default model against its targets and print them (accuracy in every
phrasing of the prompt grammar, one and two objects; CLIP zero-shot; VAE PSNR; each figure and its
target is described in sdjax/evaluation/default_model.py):

    python -m experiments.evaluate_default_model [--model=DIR] [--clip=DIR] [--out=results.json]
    python -m experiments.evaluate_default_model --prompt_set=selection --cfg_scale=7

The figures shipped with the model come from the "report" prompts; choose settings (as the CFG
default was chosen) on the "selection" prompts, a disjoint set.
"""
from __future__ import annotations


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import os

    from configs import shapes as shapes_config
    from sdjax import DEFAULT_MODEL
    from sdjax.evaluation import default_model

    clip = FLAGS.clip
    if clip is None and not FLAGS.model:
        clip = os.path.join(DEFAULT_MODEL, "clip")
    config = shapes_config.get_config()
    if FLAGS.cfg_scale is not None:
        config.cfg_scale = FLAGS.cfg_scale
    results = default_model.evaluate(config, FLAGS.model or None, clip or None,
                                     prompt_set=FLAGS.prompt_set,
                                     prompts_per_phrasing=FLAGS.prompts_per_phrasing,
                                     seeds=FLAGS.seeds, out=FLAGS.out or None,
                                     grid=FLAGS.grid or None)
    print(default_model.format_results(results))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", "", "sdjax folder; default: the embedded model")
    flags.DEFINE_string("clip", None, "native CLIP folder; default: the embedded model's clip/")
    flags.DEFINE_enum("prompt_set", "report", ["report", "selection"],
                      "report: the figures shipped with the model; selection: for choosing settings")
    flags.DEFINE_integer("prompts_per_phrasing", 12, "prompts of each of the 24 phrasings")
    flags.DEFINE_integer("seeds", 4, "seeds per prompt")
    flags.DEFINE_float("cfg_scale", None, "guidance scale (default: configs/shapes.py)")
    flags.DEFINE_string("out", "", "write the results here as JSON")
    flags.DEFINE_string("grid", "", "write two drawings of every phrasing here as a PNG")
    FLAGS = flags.FLAGS
    app.run(main)
