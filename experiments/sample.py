"""Many images from a prompt file, resumable, on one host or many.

    python -m experiments.sample --config=configs/sd15.py --model=/path/to/sd15 \
        --prompts=prompts.txt --out_dir=out --images_per_prompt=4

The prompt file is text (one prompt per line) or `.jsonl` (one object per line with any of prompt,
negative_prompt, seed, cfg_scale, steps, sampler, num_images, width, height, loras, controlnet,
control_image, control_scale, control_start, control_end, control_preprocess; the config fills
the rest). Prompts may name LoRAs with <lora:NAME:WEIGHT> tags (NAME a file of --lora_dir); --lora
applies one to every prompt. A line's ControlNet fields hold a value or a list (one per
ControlNet); --controlnet, --control_image, ... give every line's defaults. Blank lines and `#`
comments are skipped. Image i of prompt p goes to `out/<p:05d>/<i:04d>-<seed>.png`; run the same
command again after an interruption and only the missing images are drawn, identical to those of an
uninterrupted run.

Several hosts: start the same command on each with --coordinator_address=host0:port
--num_processes=N --process_id=i (on TPU pods and managed clusters JAX finds its peers without them).
"""
from absl import app, flags, logging

from sdjax import cli
from sdjax import parallel
from sdjax.sampling import batches, generate

# Without --config, the embedded model's config: with no --model it draws at its native 32 px.
cli.define_config_file("config", "configs/shapes.py", "generation config file")
flags.DEFINE_string("prompts", None, "prompt file: text, one prompt per line, or .jsonl", required=True)
flags.DEFINE_string("out_dir", None, "where the PNGs and manifest.jsonl go")
flags.DEFINE_integer("images_per_prompt", None, "images per prompt (config.num_images)")
flags.DEFINE_integer("seed", None, "base seed; prompt p defaults to seed + p * images_per_prompt")
flags.DEFINE_string("model", None, "checkpoint: diffusers folder, .safetensors file or sdjax folder")
flags.DEFINE_string("components", None, "SD3 / Flux single files: a diffusers folder of the same "
                    "family supplying what the file lacks (text encoders, tokenizers, VAE)")
flags.DEFINE_integer("batch_size", None, "images per program call over all devices (0: one per device)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs")
flags.DEFINE_integer("num_processes", None, "number of processes (hosts) in the run")
flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
generate.define_lora_flags()
generate.define_control_flags()
FLAGS = flags.FLAGS
SHORTCUTS = {"out_dir": "out_dir", "images_per_prompt": "num_images", "seed": "seed",
             "model": "model", "components": "components", "batch_size": "batch_size"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    cli.apply_shortcuts(config, SHORTCUTS)
    cli.apply_shortcuts(config, generate.LORA_SHORTCUTS)
    cli.apply_shortcuts(config, generate.CONTROL_SHORTCUTS)
    stats = batches.sample_to_dir(config, FLAGS.prompts)
    logging.info("%d written, %d already there, %d not finite; in %s", stats["written"],
                 stats["skipped"], stats["non_finite"], config.out_dir)


if __name__ == "__main__":
    cli.run(main)
