"""Sampler x steps x guidance sweeps: X/Y grids, a metrics table (CSV + Markdown) and plots.

    python -m experiments.ablate --config=configs/ablate.py --model=/path/to/model \
        --clip_model=/path/to/clip --out_dir=ablations/sd15

A LoRA's weight is an axis too: --lora=NAME --lora_dir=/path/to/loras
--config.lora_weights="(0.0,0.5,1.0)" draws every cell at each weight, with one program; and so
is a ControlNet's scale: --controlnet=PATH --control_image=IMAGE
--config.control_scales="(0.0,0.5,1.0)", and Flux.1-dev's distilled guidance:
--config.embedded_guidances="(2.0,3.5,5.0)". SD3's skip-layer guidance is a guidance variant
(--config.variants="('cfg','slg=7:8:9')"); SD3 / Flux single files take --components.

See configs/ablate.py for every setting; the flags below are shortcuts that override the config.
"""
from absl import app, flags, logging

from sdjax import cli
from sdjax.evaluation import ablation
from sdjax.sampling import generate

cli.define_config_file("config", "configs/ablate.py", "ablation config file")
flags.DEFINE_string("model", None,
                    "checkpoint: diffusers folder, .safetensors, sdjax folder or random:PRESET")
flags.DEFINE_string("clip_model", None,
                    "CLIP for the CLIP score: transformers CLIPModel or sdjax CLIP folder")
flags.DEFINE_string("components", None, "SD3 / Flux single files: a diffusers folder of the same "
                    "family supplying what the file lacks (text encoders, tokenizers, VAE)")
flags.DEFINE_string("out_dir", None, "where images, grids, tables and plots go")
generate.define_lora_flags()
generate.define_control_flags()
FLAGS = flags.FLAGS
SHORTCUTS = ("model", "clip_model", "components", "out_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    cli.apply_shortcuts(config, SHORTCUTS)
    cli.apply_shortcuts(config, generate.LORA_SHORTCUTS)
    cli.apply_shortcuts(config, generate.CONTROL_SHORTCUTS)
    result = ablation.run_sweep(config)
    logging.info("%d (cell, prompt) pairs drawn, %d resumed, %d compilations; tables in %s",
                 result["generated"], result["skipped"], result["traces"], result["markdown"])
    print(result["markdown"])


if __name__ == "__main__":
    cli.run(main)
