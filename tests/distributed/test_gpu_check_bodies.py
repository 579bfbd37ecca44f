"""The GPU check's own items run here on CPU (marker `slow`): the bodies of the bare-machine items in
tests/distributed/test_gpu_cuda.py (the bf16 LM smoke, one RL step per loss mode) are the code a short-lived GPU
machine runs, so a mistake in them shows here first, not in its minutes of GPU time. Fusions are off here (no CUDA)."""

from __future__ import annotations

import pytest
import torch

from megatron_apo.parallel import run_distributed
from tests.distributed.test_gpu_cuda import lm_smoke_body, rl_step_per_loss_body

pytestmark = pytest.mark.slow


def test_lm_smoke_body_learns_in_bf16():
    out = run_distributed(lm_smoke_body, 1, 20, timeout=600)[0]
    assert out["dtype"] == "torch.bfloat16" and out["impl"] == "local"
    assert losses_fall(out["losses"]), out["losses"]
    assert not any(out["fusions"].values())


def losses_fall(losses: list[float]) -> bool:
    return all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0]


def test_rl_step_body_runs_every_loss_mode():
    out = run_distributed(rl_step_per_loss_body, 1, [], timeout=600)[0]
    assert {"vanilla", "apo_ratio", "casp"} <= set(out)
    for mode, r in out.items():
        assert r["skipped"] == 0 and r["grad_norm"] > 0 and r["moved"] > 0, (mode, r)
