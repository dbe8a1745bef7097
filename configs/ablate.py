"""Sampler x steps x guidance sweeps -> labelled X/Y grids, metrics tables and plots.

    python -m experiments.ablate --config=configs/ablate.py --model=/path/to/model \
        --clip_model=/path/to/clip-vit-base-patch32 --out_dir=ablations/sd15

    python -m experiments.ablate --config=configs/ablate.py:tiny   # random weights, ~1 min on a CPU
    python -m experiments.ablate --config=configs/ablate.py:tiny_sd3    # the same, SD3 and SLG
    python -m experiments.ablate --config=configs/ablate.py:tiny_flux   # Flux, distilled guidance

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

SD3 / SD3.5 and Flux.1 take the flow samplers (flow_euler, flow_euler_a, flow_heun, flow_dpmpp_2m,
flow_dpmpp_2m_sde, flow_unipc), each with an optional static timestep shift in place of the
model's ("flow_euler:shift=3.0"). SD3's skip-layer guidance is a guidance variant,
"slg=LAYER:LAYER...[@START:STOP]" (the joint blocks skipped, and optionally the step window;
default config.slg_start:config.slg_stop) with an optional "slg_scale=S" (default
config.slg_scale); the blocks and window make a program of their own, the scale is data:

    python -m experiments.ablate --config=configs/ablate.py \
        --model=/path/to/sd3.5_medium.safetensors --components=/path/to/sd3.5-medium-diffusers \
        --config.height=1024 --config.width=1024 \
        --config.samplers="('flow_euler','flow_euler:shift=1.0')" --config.steps="(40,)" \
        --config.cfg_scales="(3.0,4.5,6.0)" \
        --config.variants="('cfg','slg=7:8:9','slg=7:8:9,slg_scale=4','slg=7:8:9@0.01:0.4')"

Flux.1-dev's distilled guidance scale is an axis too (data: one program for all its values):

    python -m experiments.ablate --config=configs/ablate.py --model=/path/to/FLUX.1-dev \
        --config.samplers="('flow_euler',)" --config.steps="(28,)" --config.cfg_scales="(1.0,)" \
        --config.variants="('cfg',)" --config.embedded_guidances="(2.0,3.5,5.0)" \
        --config.grid.x=embedded_guidance

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
    # "NAME" or "NAME:option=value,..." (sampler options, e.g. "dpmpp_2m:karras=true",
    # "flow_euler:shift=3.0"; SD3 / Flux models take the flow_* samplers).
    c.samplers = ("euler", "dpmpp_2m")
    c.steps = (10, 20, 30)
    c.cfg_scales = (1.0, 3.0, 5.0, 7.5, 10.0)
    # "cfg" plain; "rescale=PHI" guidance rescale; "interval=START:END" guidance only while the
    # progress 1 - t/T is inside; SD3 skip-layer guidance "slg=LAYER:LAYER...[@START:STOP]" (joint
    # blocks skipped, and the step window, default slg_start:slg_stop) with "slg_scale=S" (default
    # slg_scale); or comma-joined combinations ("rescale=0.7,interval=0.2:0.8",
    # "slg=7:8:9@0.01:0.2,slg_scale=2.8"). SLG acts only in cells whose cfg_scale is not 1.
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
    # SD3 / Flux, with configs/common.py's defaults: components (what a single file lacks),
    # max_sequence_length (T5 tokens), embedded_guidance (Flux.1-dev's distilled guidance when it
    # is not an axis), and skip-layer guidance's scale and step window for the "slg=..." variants
    # that name none of their own.
    for field in ("components", "max_sequence_length", "embedded_guidance", "slg_scale",
                  "slg_start", "slg_stop"):
        c[field] = generation[field]
    # An axis: each cell drawn at each of these distilled guidance scales (Flux.1-dev; data: no
    # more programs for them).
    c.embedded_guidances = ()
    # An axis: each cell drawn with the ControlNets of `controlnet` at each of these conditioning
    # scales (multiples of their listed scales). Scales are data: no more programs for them.
    c.control_scales = ()
    c.grid = ml_collections.ConfigDict()
    # columns: sampler | steps | variant | cfg_scale | lora_weight | control_scale |
    # embedded_guidance | prompt | seed
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
    elif arg in ("tiny_sd3", "tiny_flux"):  # random-weight SD3 / Flux.1-dev, ~1 min on a CPU
        # (random weights: these grids show that the pipeline runs and that the settings act, not
        # what they are good for; docs/flow.md's study uses a trained shapes-world SD3)
        c.model = f"random:{arg}"
        c.steps = (4,)
        c.max_sequence_length = 32
        c.num_prompts = 2
        c.num_seeds = 2
        c.height = c.width = 32
        c.out_dir = f"ablations/{arg}"
        if arg == "tiny_sd3":  # 4 programs: 2 samplers x (plain, SLG on block 1 of 2)
            c.samplers = ("flow_euler", "flow_dpmpp_2m")
            c.cfg_scales = (1.0, 4.0)
            c.variants = ("cfg", "slg=1", "slg=1,slg_scale=5")
            # Every step but the first inside the window, so skip-layer guidance shows in 4 steps.
            c.slg_start, c.slg_stop = 0.0, 1.0
            c.grid.x, c.grid.y = "cfg_scale", "variant"
        else:  # 2 programs (the static shifts); the distilled guidance is data
            c.samplers = ("flow_euler", "flow_euler:shift=3.0")
            c.cfg_scales = (1.0,)
            c.variants = ("cfg",)
            c.embedded_guidances = (1.0, 3.5, 7.0)
            c.grid.x, c.grid.y = "sampler", "embedded_guidance"
    elif arg == "flow_study":
        # The guidance study of docs/flow.md: the shapes-world SD3 (configs/train_flow_shapes.py;
        # pass its export with --model) judged on the shapes world's held-out prompts: CFG scale x
        # skip-layer guidance (blocks 2 and 3 of 6, the first half of the steps) x samplers.
        from sdjax import DEFAULT_MODEL  # a path; importing sdjax loads no jax

        c.clip_model = DEFAULT_MODEL + "/clip"
        c.height = c.width = 32
        c.max_sequence_length = 1  # no T5: one zero token (flow_study.MAX_SEQUENCE_LENGTH)
        c.samplers = ("flow_euler", "flow_dpmpp_2m")
        c.steps = (20,)
        c.cfg_scales = (1.0, 2.0, 4.0, 7.0)
        c.variants = ("cfg", "slg=2:3@0.0:0.5", "rescale=0.7")
        c.num_prompts = 16
        c.num_seeds = 4
        c.microbatch = 64
        c.grid.x, c.grid.y = "cfg_scale", "variant"
        c.out_dir = "ablations/flow_study"
    elif arg in ("default_steps", "default_guidance"):
        # The embedded shapes-world model at its native 32 px, judged on one "selection" prompt
        # of every phrasing (one and two objects; sdjax/evaluation/default_model.py: settings are
        # chosen on these, the model's figures come from the disjoint "report" prompts), CLIP
        # score from the shapes CLIP shipped beside it.
        from sdjax import DEFAULT_MODEL  # a path; importing sdjax loads no jax
        from sdjax.data import shapes

        c.model = ""
        c.clip_model = DEFAULT_MODEL + "/clip"
        c.height = c.width = 32
        c.prompts = tuple(shapes.phrased_prompts(p, 1, of_set="selection")[0]
                          for p in shapes.PHRASINGS)
        c.num_prompts = 0
        c.num_seeds = 4
        c.microbatch = 96
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
                         "(known: tiny, tiny_sd3, tiny_flux, default_steps, default_guidance)")
    c.lock()
    return c
