"""sdjax: latent diffusion (Stable Diffusion) in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# Files shipped inside the package: the CLIP BPE vocabulary and the embedded default model.
ASSETS_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets")
# The embedded shapes-world model (experiments/build_default_model.py): what an empty `model` loads.
DEFAULT_MODEL = _os.path.join(ASSETS_DIR, "default_model")

def lazy_exports(module_name: str, table: dict):
    """A module `__getattr__` that imports `table[name]` (a module path) on first use of `name`,
    so importing a package stays light: the loaders pull in jax and flax only when used."""
    def __getattr__(name):
        if name in table:
            import importlib

            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_exports(__name__, {
    "load_pretrained": "sdjax.weights.pretrained",
    "save_pretrained": "sdjax.weights.pretrained",
    "Pretrained": "sdjax.weights.pretrained",
})
