"""Text-to-image, image-to-image and inpainting from the command line.

    python -m experiments.generate --prompt "a red circle on the left, blue background"

draws with the embedded shapes-world model (configs/shapes.py, 32 px, CPU in seconds). Any other
checkpoint:

    python -m experiments.generate --config=configs/sd15.py --model=/path/to/checkpoint \
        --prompt="a photo of a cat" --config.sampler=dpmpp_2m --config.steps=25

SD 3.5 and Flux.1 (configs/sd35.py, flux_dev.py, flux_schnell.py; a single file takes the parts it
lacks from --components, a diffusers folder of the same family):

    python -m experiments.generate --config=configs/flux_dev.py --model=/path/to/flux1-dev.safetensors \
        --components=/path/to/FLUX.1-dev --prompt="a cat holding a sign" --embedded_guidance=3.5

With LoRAs (a <lora:NAME:WEIGHT> tag in the prompt, or --lora for every image):

    python -m experiments.generate --config=configs/sd15.py --model=/path/to/checkpoint \
        --lora_dir=/path/to/loras --prompt="a photo of a cat <lora:watercolor:0.8>"

With ControlNets (repeat --controlnet for several; each takes the --control_image, --control_scale
... of the same place):

    python -m experiments.generate --config=configs/sd15.py --model=/path/to/checkpoint \
        --controlnet=/path/to/control_v11p_sd15_canny --control_image=edges.png \
        --control_preprocess=canny --control_scale=0.8 --prompt="a house in a forest"

Every config field can be overridden as --config.FIELD=value; the flags below are shortcuts for the
most used fields and, when given, override the config.
"""
from absl import app, flags, logging

from sdjax import cli
from sdjax.sampling import generate

cli.define_config_file("config", "configs/shapes.py", "generation config file")
flags.DEFINE_string("prompt", None, "what to draw")
flags.DEFINE_string("negative_prompt", None, "what to steer away from")
flags.DEFINE_integer("seed", None, "seed of the first image; image i uses seed + i")
flags.DEFINE_integer("num_images", None, "how many images")
flags.DEFINE_float("cfg_scale", None, "classifier-free guidance scale")
flags.DEFINE_integer("height", None, "image height in pixels (a multiple of 8)")
flags.DEFINE_integer("width", None, "image width in pixels (a multiple of 8)")
flags.DEFINE_string("model", None, "checkpoint: diffusers folder, .safetensors file or sdjax folder "
                    "(default: the embedded shapes-world model)")
flags.DEFINE_string("vae", None, "standalone VAE replacing the checkpoint's (folder or file)")
flags.DEFINE_string("components", None, "SD3 / Flux single files: a diffusers folder of the same "
                    "family supplying what the file lacks (text encoders, tokenizers, VAE)")
flags.DEFINE_float("embedded_guidance", None, "Flux.1-dev's distilled guidance scale (a model "
                   "input; --cfg_scale above 1 adds true classifier-free guidance)")
flags.DEFINE_string("init_image", None, "image to start from (img2img; with --mask, inpainting)")
flags.DEFINE_float("strength", None, "img2img strength in (0, 1]: how much of the image is redrawn")
flags.DEFINE_string("mask", None, "inpainting mask, white = repaint")
flags.DEFINE_string("out_dir", None, "where the PNGs go")
generate.define_lora_flags()
generate.define_control_flags()
FLAGS = flags.FLAGS
SHORTCUTS = ("prompt", "negative_prompt", "seed", "num_images", "cfg_scale", "height", "width",
             "model", "vae", "components", "embedded_guidance", "init_image", "strength", "mask",
             "out_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    cli.apply_shortcuts(config, SHORTCUTS)
    cli.apply_shortcuts(config, generate.LORA_SHORTCUTS)
    cli.apply_shortcuts(config, generate.CONTROL_SHORTCUTS)
    if not config.prompt:
        raise app.UsageError("--prompt is required")
    paths = generate.generate_to_dir(config)
    logging.info("wrote %d image(s) to %s", len(paths), config.out_dir)
    print("\n".join(paths))


if __name__ == "__main__":
    cli.run(main)
