#!/usr/bin/env bash
# The GPU install that works (docs/vllm.md, "Installing"): `pip install -e '.[gpu]'` alone does not, because pip
# builds Transformer Engine's PyTorch module in an isolated environment with the newest torch, and the module then
# fails to load next to the torch vLLM pins. So: torch first (vLLM's exact pin), the package and vLLM, then
# Transformer Engine built against that torch (--no-build-isolation). Needs the CUDA toolkit (nvcc) for TE's build.
#
#   bash scripts/install_gpu.sh                          # into .venv if it exists, else the current python3
#   PYTHON=/path/to/python bash scripts/install_gpu.sh   # into that interpreter's environment
#   EXTRAS=dev bash scripts/install_gpu.sh               # also an extra of the package (default: none)
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

# the gpu extra's pins, read from pyproject.toml (one list, no second copy to drift); torch is vLLM's exact pin
mapfile -t gpu_reqs < <("$py" - <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))
PY
)
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

echo "install_gpu: $torch_spec into $("$py" -c 'import sys; print(sys.prefix)')"
pip_install "$torch_spec"
if [ -n "${EXTRAS:-}" ]; then pip_install -e ".[$EXTRAS]"; else pip_install -e .; fi
pip_install ninja pybind11 setuptools wheel  # Transformer Engine's build needs them (no build isolation)
for req in "${gpu_reqs[@]}"; do
  case "$req" in
    transformer-engine*|transformer_engine*)
      echo "install_gpu: $req (compiles against the installed torch; a while)"
      pip_install --no-build-isolation "$req" ;;
    *) echo "install_gpu: $req"; pip_install "$req" ;;
  esac
done
"$py" - "$torch_spec" <<'PY'
import sys

import torch
import transformer_engine.pytorch  # noqa: F401  (fails here, not in the first training step)
import vllm

want = sys.argv[1].split("==")[-1]
if "==" in sys.argv[1] and torch.__version__.split("+")[0] != want:
    sys.exit(f"install_gpu: torch is {torch.__version__} after the install, not {want}: something upgraded it")
print(f"install_gpu: ok (torch {torch.__version__}, vllm {vllm.__version__}, Transformer Engine imports)")
PY
