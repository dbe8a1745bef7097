#!/usr/bin/env bash
# The diffusers-Flax reference venv for benchmarks/unet_forward.py: diffusers 0.39.0 is the last
# release with Flax models, and it needs transformers 4.x. Installed on top of the jax/flax that
# sdjax uses (copied from this interpreter's versions), so both sides run the same XLA.
#
#   bash benchmarks/setup_references.sh [PYTHON]      # creates .venv-flax-ref at the repo root
#
# torch is not installed: the Flax worker builds its model from a config with random weights.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-python3}"
VENV="$ROOT/.venv-flax-ref"

versions="$("$PYTHON" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("jax", "jaxlib", "flax", "numpy")))
EOF
)"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $versions "diffusers==0.39.0" "transformers==4.57.6" \
    safetensors
"$VENV/bin/python" -c "from diffusers import FlaxUNet2DConditionModel; print('ok: diffusers-Flax reference in $VENV')"
