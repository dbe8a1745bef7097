"""Shared pieces of the experiment configs. Sampling defaults are `SamplingSpec`'s own (a module
that imports no jax), so the library and the configs cannot disagree."""
import ml_collections

from sdjax.sampling.spec import SamplingSpec

# JAX's persistent compilation cache; sdjax keeps its exported sampling programs beside it.
COMPILATION_CACHE = "~/.cache/sdjax/xla"


def generation_config(*, height: int, width: int, model: str = "", cfg_scale: float = 7.5,
                      steps: int = SamplingSpec.steps, sampler: str = SamplingSpec.sampler,
                      progress: bool = True) -> ml_collections.ConfigDict:
    """Every setting of `experiments/generate.py` and `experiments/sample.py`; flags of the same
    name override these."""
    c = ml_collections.ConfigDict()
    c.model = model              # checkpoint: diffusers folder, single .safetensors, or sdjax folder
    c.vae = ""                   # optional standalone VAE replacing the checkpoint's
    # SD3 / Flux single files: a diffusers folder of the same family supplying what the file lacks
    # (text encoders, tokenizers, VAE, scheduler)
    c.components = ""
    c.dtype = "float32"          # float32 | bfloat16 | float16 (compute and params)
    c.prediction_type = ""       # override the checkpoint's (single files can't tell v-prediction)
    c.prompt = ""
    c.negative_prompt = ""
    c.seed = 0                   # image i uses seed + i
    c.num_images = 1             # sample.py: images per prompt
    c.batch_size = 0             # images per program call; 0 = num_images (sample.py: one per device)
    c.subseed = -1               # variation seed (-1: none); image i uses subseed + i
    c.subseed_strength = 0.0
    c.sampler = sampler
    c.steps = steps
    # Options every sampler that has them reads; off values are dropped for the others.
    c.sampler_options = ml_collections.ConfigDict({"karras": False, "exponential": False})
    c.cfg_scale = cfg_scale
    c.guidance_rescale = 0.0
    c.guidance_interval = (0.0, 1.0)
    c.clip_skip = SamplingSpec.clip_skip
    # SD3 / Flux. embedded_guidance: Flux-dev's distilled guidance scale (the model input; true CFG
    # runs only when cfg_scale != 1). max_sequence_length: T5 tokens (0: the family's default).
    # slg_*: skip-layer guidance (SD3.5): the joint blocks skipped, scale, and the step window.
    c.embedded_guidance = 3.5
    c.max_sequence_length = SamplingSpec.max_sequence_length
    c.slg_layers = SamplingSpec.slg_layers
    c.slg_scale = 2.8
    c.slg_start = SamplingSpec.slg_start
    c.slg_stop = SamplingSpec.slg_stop
    c.height = height
    c.width = width
    c.init_image = ""            # img2img (and inpainting) source image
    c.strength = 0.75
    c.mask = ""                  # inpainting mask: white = repaint
    c.inpaint_overlay = True     # keep the init image's pixels outside the (blurred) mask
    c.mask_blur = 4.0            # Gaussian radius of that overlay's edge, in pixels
    # LoRAs applied to every image, each "NAME_OR_PATH[:UNET_WEIGHT[:TE_WEIGHT]]" (a name is a file
    # of lora_dir or a folder below it, by stem); prompts may add more with <lora:NAME:WEIGHT>.
    c.loras = ()
    c.lora_dir = ""
    c.lora_mode = "runtime"      # runtime (weights are data: no recompiling) | merged (into kernels)
    c.embeddings_dir = ""        # textual-inversion embeddings, usable in prompts by file name
    # ControlNets applied to every image (a diffusers folder or .safetensors, or a name of
    # controlnet_dir), each with its control image, conditioning scale (default 1), the fraction of
    # the steps it acts in (start, end) and its preprocessor (none | mask | canny): one value per
    # ControlNet in the same order (start, end and preprocess may give one for all). Prompt files
    # set them per line under the same names.
    c.controlnet = ()
    c.control_image = ()
    c.control_scale = ()
    c.control_start = ()
    c.control_end = ()
    c.control_preprocess = ()
    c.control_guess_mode = False  # ControlNets act on the conditional half only (diffusers')
    c.controlnet_dir = ""
    c.parallel = "jit"           # jit (mesh + shardings) | pmap
    c.fsdp = 1                   # >1: split large params over this many devices
    # A per-step bar is a host callback inside the program, which keeps it from being exported
    # (sdjax/exported.py): a launch with it on traces the program again instead of loading it.
    c.progress = progress
    c.out_dir = "outputs"
    c.compilation_cache = COMPILATION_CACHE
    return c
