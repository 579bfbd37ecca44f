"""The shipped run configs load, name real model configs, and pass every check that needs no data on disk."""

from pathlib import Path

import pytest

from megatron_apo.algorithms.settings import validate_algorithm_config
from megatron_apo.config import load_config
from megatron_apo.models.config import load_model_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_run_config_is_consistent(path):
    cfg = load_config(path)
    p = cfg.parallel
    load_model_config(cfg.model.config).validate(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    validate_algorithm_config(cfg.algorithm)
    assert cfg.algorithm.loss_mode == "apo_ratio" and cfg.rollout.engine == "vllm"


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"apo_qwen2.5_32b.yaml", "apo_qwen2.5_7b.yaml"}
