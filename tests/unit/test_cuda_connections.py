"""CUDA_DEVICE_MAX_CONNECTIONS=1 belongs to the trainer ranks' CUDA contexts only: not image-wide, not exported
before `ray start`, and not left in a rank's environment for what it starts later (rank 0's local Ray and its
vLLM engines). No GPU here: `bind_gpu` runs with torch's two CUDA calls recorded instead of made."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from megatron_apo.parallel import cuda_context

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def seen(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i, os.environ.get(
        "CUDA_DEVICE_MAX_CONNECTIONS"))))
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None: calls.append(("context", device, os.environ.get(
        "CUDA_DEVICE_MAX_CONNECTIONS"))))
    return calls


def test_set_while_the_context_is_made_then_gone(monkeypatch, seen):
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    cuda_context.bind_gpu(3)
    assert seen == [("set_device", 3, "1"), ("context", "cuda:3", "1")]
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ  # what the rank spawns later does not inherit it


def test_a_value_the_user_set_is_kept(monkeypatch, seen):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "4")
    cuda_context.bind_gpu(0)
    assert seen[-1] == ("context", "cuda:0", "4") and os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "4"


def test_init_distributed_binds_through_it():
    src = (REPO / "megatron_apo" / "parallel" / "distributed.py").read_text()
    assert "bind_gpu(local_device_index())" in src and "torch.cuda.set_device(" not in src


def test_not_set_for_the_whole_image_or_job():
    dockerfile = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    assert not re.search(r"^ENV .*CUDA_DEVICE_MAX_CONNECTIONS", dockerfile, re.M)
    for script in [*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/lib/*.sh")]:
        assert not re.search(r"^\s*export\s+CUDA_DEVICE_MAX_CONNECTIONS", script.read_text(), re.M), script.name
