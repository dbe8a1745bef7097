"""Rebuild the embedded default model (sdjax/assets/default_model) from scratch, with sdjax's own
training loop: shapes-world data -> CLIP (configs/shapes_clip.py) -> VAE (configs/shapes_vae.py)
-> latent diffusion (configs/shapes_ldm.py: U-Net trained, VAE frozen, the CLIP text tower
fine-tuned at its own lr, caption dropout, every caption rewritten in a random phrasing as it is
read) -> the same continued on captions that name positions more often
(configs/shapes_ldm_positions.py) -> export + evaluation (sdjax/evaluation/default_model.py).

    python -m experiments.build_default_model --workdir=/tmp/sdjax_default_model

Every stage checkpoints into --workdir and resumes there, so the same command continues an
interrupted build. Stage lengths can be overridden (--clip_steps, --vae_steps, --ldm_steps,
--ldm_positions_steps).
"""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).absolute().parent.parent


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from configs import shapes, shapes_clip, shapes_ldm, shapes_ldm_positions, shapes_vae
    from sdjax.evaluation import default_model_build

    def steps(flag):
        value = FLAGS[flag].value
        if value is not None and value <= 0:
            raise app.UsageError(f"--{flag} must be a positive number of steps, got {value}")
        return str(value) if value is not None else None

    configs = default_model_build.BuildConfigs(
        clip=shapes_clip.get_config(steps("clip_steps")),
        vae=shapes_vae.get_config(steps("vae_steps")),
        ldm=shapes_ldm.get_config(steps("ldm_steps")),
        ldm_positions=shapes_ldm_positions.get_config(steps("ldm_positions_steps")),
        generation=shapes.get_config())
    record = default_model_build.build(FLAGS.workdir, FLAGS.out, configs,
                                       num_examples=FLAGS.num_examples,
                                       prompts_per_phrasing=FLAGS.eval_prompts_per_phrasing,
                                       eval_seeds=FLAGS.eval_seeds,
                                       progress=FLAGS.progress)
    print(default_model_build.format_build(record))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", "/tmp/sdjax_default_model", "data, checkpoints, stage exports")
    flags.DEFINE_string("out", str(ROOT / "sdjax" / "assets" / "default_model"),
                        "where the finished model folder goes")
    flags.DEFINE_integer("num_examples", 50_000, "training images written to the data folder")
    flags.DEFINE_integer("clip_steps", None, "CLIP steps (default: configs/shapes_clip.py)")
    flags.DEFINE_integer("vae_steps", None, "VAE steps (default: configs/shapes_vae.py)")
    flags.DEFINE_integer("ldm_steps", None, "LDM steps (default: configs/shapes_ldm.py)")
    flags.DEFINE_integer("ldm_positions_steps", None,
                         "steps of the last stage (default: configs/shapes_ldm_positions.py)")
    flags.DEFINE_integer("eval_prompts_per_phrasing", 12,
                         "report prompts per phrasing the finished model is evaluated on")
    flags.DEFINE_integer("eval_seeds", 4, "seeds per evaluation prompt")
    flags.DEFINE_bool("progress", False, "progress bars")
    FLAGS = flags.FLAGS
    app.run(main)
