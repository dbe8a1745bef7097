"""Evaluate the embedded default model against its targets and print them (held-out accuracy,
CLIP zero-shot, accuracy on prompts as people write them, VAE PSNR; each figure and its target is
described in sdjax/evaluation/default_model.py):

    python -m experiments.evaluate_default_model [--model=DIR] [--clip=DIR] [--out=results.json]
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
    results = default_model.evaluate(shapes_config.get_config(), FLAGS.model or None,
                                     clip or None, num_prompts=FLAGS.num_prompts,
                                     out=FLAGS.out or None)
    print(default_model.format_results(results))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", "", "sdjax folder; default: the embedded model")
    flags.DEFINE_string("clip", None, "native CLIP folder; default: the embedded model's clip/")
    flags.DEFINE_integer("num_prompts", 0, "evaluate this many held-out prompts (0 = all 280)")
    flags.DEFINE_string("out", "", "write the results here as JSON")
    FLAGS = flags.FLAGS
    app.run(main)
