"""Evaluate the embedded default model against its targets and print them:

  held-out accuracy   every single-object held-out prompt (`shapes.heldout_prompts`, 280) drawn
                      once at the default generation settings (configs/shapes.py), checked by
                      `judge`; the fraction with every attribute right (target >= 90%)
  CLIP zero-shot      for held-out single-object images, each attribute (colour, shape, size,
                      position, background) is predicted by the caption, among the true caption
                      with that attribute set to each possible value, that the shapes CLIP ranks
                      first; the fraction of right predictions (target >= 95%)
  as prompts are     the same held-out scenes in the phrasings people write
  written             (`shapes.caption_variant`: attributes left out, "on a blue background"),
                      judged on what each prompt says (reported, no target)
  VAE PSNR            mean per-image PSNR of posterior-mean reconstructions of held-out images
                      (target >= 30 dB)

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
