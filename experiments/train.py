"""Training: latent diffusion (also the VAE and CLIP objectives), one config per run.

    python -m experiments.train --config=configs/train_tiny.py --workdir=/tmp/tiny \
        --config.data.folder=/path/to/images_with_txt

A run resumes from the latest checkpoint in --workdir. Multi-host: start the same command on every
host with --coordinator_address=HOST:PORT --num_processes=N --process_id=i. With
--export_checkpoint=N (or `latest`) it trains nothing: it exports that checkpoint of the run into
<workdir>/exports/step_N (a LoRA run: its LoRA files; a ControlNet run: its ControlNet, as
diffusers' folder `controlnet/`) and exits.
"""
import sys

from absl import app, flags, logging

from sdjax import cli

cli.define_config_file("config", "configs/train_tiny.py", "training config file")
flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples and exports go here",
                    required=True)
flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_string("export_checkpoint", None,
                    "export this checkpoint step (or `latest`) of the run in --workdir and exit")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from sdjax import parallel
    from sdjax.training import loop

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    if FLAGS.export_checkpoint is not None:
        step = None if FLAGS.export_checkpoint == "latest" else _step(FLAGS.export_checkpoint)
        loop.export_checkpoint(FLAGS.config, FLAGS.workdir, step)
        return
    try:
        result = loop.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    except loop.TrainingDiverged as err:
        logging.error("%s", err)
        sys.exit(f"training diverged: {err}")
    logging.info("stopped (%s) at step %d; %.3g examples/s", result["stopped"], result["step"],
                 result["examples_per_sec"])


def _step(value: str) -> int:
    if not value.isdigit():
        raise app.UsageError(f"--export_checkpoint={value}: a checkpoint step or `latest`")
    return int(value)


if __name__ == "__main__":
    cli.run(main)
