"""Sampler x steps x guidance sweeps -> labelled X/Y grids, metrics tables and plots.

    python -m experiments.ablate --config=configs/ablate.py --model=/path/to/model \
        --clip_model=/path/to/clip-vit-base-patch32 --out_dir=ablations/sd15

    python -m experiments.ablate --config=configs/ablate.py:tiny   # random weights, ~1 min on a CPU

The study of the embedded default model (docs/ablation_default_model.md) is two runs:

    python -m experiments.ablate --config=configs/ablate.py:default_steps
    python -m experiments.ablate --config=configs/ablate.py:default_guidance

Any field can be overridden, e.g. --config.samplers="('euler_a','dpmpp_2m:karras=true')"
--config.cfg_scales="(1.0,5.0,9.0)" --config.grid.x=steps --config.grid.y=cfg_scale. A LoRA's
weight as an axis:

    python -m experiments.ablate --config=configs/ablate.py --model=/path/to/model \
        --lora=watercolor --lora_dir=/path/to/loras --config.lora_weights="(0.0,0.5,1.0)" \
        --config.grid.x=lora_weight

and a ControlNet's conditioning scale (the same flags as experiments/generate.py's):

    python -m experiments.ablate --config=configs/ablate.py --model=/path/to/model \
        --controlnet=/path/to/controlnet --control_image=edges.png \
        --config.control_scales="(0.0,0.5,1.0)" --config.grid.x=control_scale

Run the same command again after an interruption: finished (cell, prompt) pairs are skipped.
"""
import ml_collections

from configs.common import COMPILATION_CACHE, generation_config
from sdjax.sampling.spec import SamplingSpec


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = ""                 # diffusers folder, single .safetensors, sdjax folder, random:PRESET
    c.vae = ""
    c.prediction_type = ""
    c.dtype = "float32"          # float32 | bfloat16 | float16
    c.clip_model = ""            # transformers CLIPModel folder or sdjax CLIP folder; "" = no CLIP score
    # "NAME" or "NAME:option=value,..." (sampler options, e.g. "dpmpp_2m:karras=true").
    c.samplers = ("euler", "dpmpp_2m")
    c.steps = (10, 20, 30)
    c.cfg_scales = (1.0, 3.0, 5.0, 7.5, 10.0)
    # "cfg" plain; "rescale=PHI" guidance rescale; "interval=START:END" guidance only while the
    # progress 1 - t/T is inside; or comma-joined combinations ("rescale=0.7,interval=0.2:0.8").
    c.variants = ("cfg", "rescale=0.7", "interval=0.2:0.8")
    c.prompts = ()               # explicit prompts; else prompt_file; else shapes held-out prompts
    c.prompt_file = ""           # one prompt per line, # comments
    c.num_prompts = 8            # evenly spaced subset of the prompts (0: all)
    c.negative_prompt = ""
    c.seed = 0                   # every prompt and cell uses seeds seed .. seed + num_seeds - 1
    c.num_seeds = 4
    c.height = 512
    c.width = 512
    c.clip_skip = 0
    c.microbatch = SamplingSpec.microbatch  # images denoised together per device
    # LoRAs applied to every cell, "NAME_OR_PATH[:UNET_WEIGHT[:TE_WEIGHT]]" each (a name is a file
    # of lora_dir, by stem); prompts may name more with <lora:NAME:WEIGHT>.
    c.loras = ()
    # An axis: each cell drawn with the LoRAs of `loras` at each of these weights (multiples of
    # their listed weights). Weights are data: the sweep compiles no more programs for them.
    c.lora_weights = ()
    c.lora_dir = ""
    c.lora_mode = "runtime"      # runtime | merged (see configs/common.py)
    c.embeddings_dir = ""        # textual-inversion embeddings, usable in prompts by file name
    # ControlNets applied to every cell: configs/common.py's fields, with its defaults (controlnet,
    # control_image, control_scale, control_start, control_end, control_preprocess: one value per
    # ControlNet; control_guess_mode, controlnet_dir).
    generation = generation_config(height=512, width=512)
    for field in generation.keys():
        if field.startswith("control"):
            c[field] = generation[field]
    # An axis: each cell drawn with the ControlNets of `controlnet` at each of these conditioning
    # scales (multiples of their listed scales). Scales are data: no more programs for them.
    c.control_scales = ()
    c.grid = ml_collections.ConfigDict()
    # columns: sampler | steps | variant | cfg_scale | lora_weight | control_scale | prompt | seed
    c.grid.x = "cfg_scale"
    c.grid.y = "sampler"         # rows: as x; one grid file per combination of the other axes
    c.grid.max_prompts = 8       # prompts per grid when the prompt is an axis (0: all)
    c.warmup = True              # compile outside the timed call (one extra call per program)
    c.resume = True              # skip finished (cell, prompt) pairs found in out_dir
    c.parallel = "jit"
    c.fsdp = 1
    c.out_dir = "ablations/run"
    c.compilation_cache = COMPILATION_CACHE

    if arg == "tiny":
        c.model = "random:tiny"
        c.samplers = ("euler", "ddim")
        c.steps = (2, 4)
        c.cfg_scales = (1.0, 7.5)
        c.variants = ("cfg", "rescale=0.7")
        c.num_prompts = 2
        c.num_seeds = 2
        c.height = c.width = 32
        c.out_dir = "ablations/tiny"
    elif arg in ("default_steps", "default_guidance"):
        # The embedded shapes-world model at its native 32 px, judged on its held-out prompts,
        # CLIP score from the shapes CLIP shipped beside it.
        from sdjax import DEFAULT_MODEL  # a path; importing sdjax loads no jax

        c.model = ""
        c.clip_model = DEFAULT_MODEL + "/clip"
        c.height = c.width = 32
        c.num_prompts = 16
        c.num_seeds = 4
        c.microbatch = 64
        if arg == "default_steps":  # samplers x steps x guidance scale, plain guidance
            c.samplers = ("euler", "euler_a", "ddim", "dpmpp_2m", "heun")
            c.steps = (3, 5, 10, 20, 50)
            c.cfg_scales = (1.0, 2.0, 4.0, 7.0, 10.0)
            c.variants = ("cfg",)
            c.grid.x, c.grid.y = "cfg_scale", "sampler"
        else:  # guidance variants at the default sampler and steps
            c.samplers = ("dpmpp_2m",)
            c.steps = (20,)
            c.cfg_scales = (2.0, 4.0, 7.0, 10.0)
            c.variants = ("cfg", "rescale=0.7", "interval=0.2:0.8", "interval=0.0:0.5")
            c.grid.x, c.grid.y = "cfg_scale", "variant"
        c.out_dir = f"ablations/{arg}"
    elif arg:
        raise ValueError(f"configs/ablate.py: unknown variant {arg!r} "
                         "(known: tiny, default_steps, default_guidance)")
    c.lock()
    return c
