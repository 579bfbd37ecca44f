"""Run by tests/unit/test_gpu_wheels.py in an interpreter that sees only what a bare GPU machine has (torch,
transformers, safetensors, numpy, pytest and their requirements) plus the wheels of `scripts/gpu_wheels.sh`: the
imports `scripts/gpu_check.sh --wheels` makes, and its bare-machine items run on CPU (short), must all work.

Prints one line per item and `probe: ok` last; any failure is a traceback and a non-zero exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    sys.path.insert(0, REPO)
    for banned in ("ray", "vllm", "transformer_engine"):  # the probe's interpreter must really be bare
        try:
            __import__(banned)
        except ImportError:
            continue
        raise SystemExit(f"probe: {banned} imports here; the interpreter is not a bare one")

    # the collection of the gpu-marked test files, and the bench's training phase module
    r = subprocess.run([sys.executable, "-S", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "-m", "gpu", "tests/distributed/test_gpu_cuda.py", "tests/distributed/test_rollout_gpu.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"probe: collecting the gpu tests failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    print("probe: gpu tests collect")
    import pytest_timeout  # noqa: F401

    import bench.gpu_step  # noqa: F401
    from megatron_apo.parallel import run_distributed
    from tests.distributed import test_gpu_cuda as g

    print("probe: lm smoke", run_distributed(g.lm_smoke_body, 1, 2, timeout=600)[0]["impl"])
    modes = run_distributed(g.rl_step_per_loss_body, 1, [], timeout=600)[0]
    print("probe: rl step per loss mode", sorted(modes))
    with tempfile.TemporaryDirectory() as tmp:
        run_distributed(g.save_on_gpu_body, 1, os.path.join(tmp, "a"), timeout=600)
        run_distributed(g.load_on_gpu_body, 1, os.path.join(tmp, "a"), timeout=600)
    print("probe: checkpoint save and load")
    from tests.distributed.test_vocab_parallel_ops import CASES
    from tests.helpers.vocab_parallel_bodies import run_ops_case

    run_ops_case(next(c for c in CASES.values() if not c.get("strided")), rank=0, tp=1)
    print("probe: vocab-parallel ops")
    print("probe: ok")


if __name__ == "__main__":
    main()
