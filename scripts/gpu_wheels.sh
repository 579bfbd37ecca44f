#!/usr/bin/env bash
# Downloads the wheels a bare GPU machine lacks for `scripts/gpu_check.sh --wheels DIR` (docs/gpu.md, "A GPU check
# that fits a bare GPU machine"). Run it where the package index is reachable; carry DIR to the GPU machine with
# the source tree. Such a machine has Python 3.12, CUDA torch, transformers, safetensors, numpy and pytest, and no
# network: DIR holds megatron-core (compiled, cp312 manylinux) and the small pure-Python packages the check imports
# that those do not bring; no torch. At most 60 MiB (tests/unit/test_gpu_wheels.py checks the size and that these
# wheels cover every import the check makes).
#
#   bash scripts/gpu_wheels.sh DIR                     # cp312, manylinux x86_64
#   PY_VERSION=3.11 bash scripts/gpu_wheels.sh DIR     # another target Python (the CPU test uses this machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: bash scripts/gpu_wheels.sh DIR}"
py="${PYTHON:-python3}"
py_version="${PY_VERSION:-3.12}"
abi="cp${py_version//./}"

# megatron-core and what it imports (its own requirements: torch, numpy, packaging are on the machine); the
# package's config (omegaconf), dist_checkpointing's psutil, the CLI's logging (rich), and
# pytest-timeout (a hung NCCL test must end). Pins follow pyproject.toml.
WHEELS=(
  "megatron-core==0.16.1"
  "omegaconf>=2.3"
  "psutil"
  "rich" "markdown-it-py" "mdurl" "pygments"
  "pytest-timeout>=2.3"
)
PLATFORMS=()
for v in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${v}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform linux_x86_64)

mkdir -p "$dir"
"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --dest "$dir" \
  --python-version "$py_version" --implementation cp --abi "$abi" --abi abi3 --abi none "${PLATFORMS[@]}" \
  "${WHEELS[@]}"
size_kib=$(du -sk "$dir" | cut -f1)
echo "gpu_wheels: $(find "$dir" -name '*.whl' | wc -l) wheels, $((size_kib / 1024)) MiB in $dir (Python $py_version)"
if [ "$size_kib" -gt $((60 * 1024)) ]; then
  echo "gpu_wheels: $dir is larger than 60 MiB; a bare GPU machine takes at most 64 MiB besides the source" >&2
  exit 1
fi
