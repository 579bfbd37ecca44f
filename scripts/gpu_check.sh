#!/usr/bin/env bash
# One-command GPU check (docs/gpu.md): on a machine with >= 1 NVIDIA GPU, sets up the `gpu` extra, runs the
# `gpu`-marked tests and bench/gpu_step.py, and ends with a pass/fail table. Without a GPU: one line, exit 0.
#
#   bash scripts/gpu_check.sh            # in the project's image, or on a bare GPU node (builds .venv)
#   PYTHON=/path/to/python bash scripts/gpu_check.sh   # use that interpreter's environment as it is
#
# Exit status: 0 when every test passed (or was skipped for lack of a second GPU) and the benchmark ran.
set -euo pipefail
cd "$(dirname "$0")/.."

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

# 1) the environment: an interpreter that already has the stack (the image), else .venv with the gpu extra
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if python3 -c "import megatron_apo, vllm, transformer_engine.pytorch" >/dev/null 2>&1; then
    py=python3
  else
    echo "gpu_check: setting up .venv with the gpu extra (first run only; Transformer Engine compiles for a while)"
    TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}" bash scripts/setup.sh
    py=.venv/bin/python
    # the gpu extra's pins, read from pyproject.toml; TE must build against the torch installed above
    mapfile -t gpu_reqs < <("$py" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))')
    "$py" -m pip install -q --disable-pip-version-check ninja pybind11 setuptools wheel  # TE's build needs them
    for req in "${gpu_reqs[@]}"; do
      "$py" -m pip install -q --disable-pip-version-check --no-build-isolation "$req"
    done
  fi
fi

# 2) the gpu-marked tests (JUnit XML for the table)
set +e
"$py" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/tests.xml" tests/ 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
# 3) the benchmark: one JSON line last
timeout 420 "$py" bench/gpu_step.py 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
set -e

# 4) the table
"$py" - "$out/tests.xml" "$out/bench.log" "$bench_rc" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET

rows = []
try:
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        status = "PASS"
        for tag, label in (("failure", "FAIL"), ("error", "FAIL"), ("skipped", "SKIP")):
            el = case.find(tag)
            if el is not None:
                status = label if tag != "skipped" else f"SKIP ({(el.get('message') or '')[:60]})"
        rows.append((name, status))
except (OSError, ET.ParseError) as e:
    rows.append(("pytest -m gpu", f"FAIL (no report: {e})"))
lines = [ln for ln in open(sys.argv[2]).read().splitlines() if ln.startswith("{")]
if sys.argv[3] == "0" and lines:
    bench = json.loads(lines[-1])
    rows.append(("bench/gpu_step.py", "PASS " + ", ".join(f"{k}={v}" for k, v in bench.items()
                                                         if k in ("train_mfu", "fleet_vs_vllm_tokens_per_s"))))
else:
    rows.append(("bench/gpu_step.py", f"FAIL (exit {sys.argv[3]})"))
width = max(len(n) for n, _ in rows)
print(f"\n{'check':<{width}}  result")
for n, s in rows:
    print(f"{n:<{width}}  {s}")
PY
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
  echo "gpu_check: FAILED (tests exit $tests_rc, bench exit $bench_rc; logs in $out/)"
  exit 1
fi
echo "gpu_check: all passed (logs in $out/)"
