"""sdjax: latent diffusion (Stable Diffusion) in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# Files shipped inside the package: the CLIP BPE vocabulary and the embedded default model.
ASSETS_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets")
# The embedded shapes-world model (experiments/build_default_model.py): what an empty `model` loads.
DEFAULT_MODEL = _os.path.join(ASSETS_DIR, "default_model")

_LAZY = {
    "load_pretrained": "sdjax.weights.pretrained",
    "save_pretrained": "sdjax.weights.pretrained",
    "Pretrained": "sdjax.weights.pretrained",
}


def __getattr__(name):
    # Keeps `import sdjax` light: the loaders pull in jax and flax only when used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
