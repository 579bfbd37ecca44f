"""The shipped run configs load, name real model configs, and pass every check that needs no data on disk."""

from pathlib import Path

import pytest

from megatron_apo.algorithms.settings import validate_algorithm_config
from megatron_apo.config import load_config
from megatron_apo.models.config import load_model_config

ALL = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
STUDIES = [p for p in ALL if p.name.startswith("study_")]  # `megatron-apo study` configs
CONFIGS = [p for p in ALL if p not in STUDIES]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_run_config_is_consistent(path):
    cfg = load_config(path)
    p = cfg.parallel
    load_model_config(cfg.model.config).validate(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    validate_algorithm_config(cfg.algorithm)
    assert cfg.algorithm.loss_mode == "apo_ratio" and cfg.rollout.engine == "vllm"


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"apo_qwen2.5_32b.yaml", "apo_qwen2.5_7b.yaml"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_config_is_consistent(path):
    from megatron_apo.study import load_study_config
    from megatron_apo.study.runner import run_overrides

    cfg = load_study_config(path)
    paths = {"model": cfg.task.model, "train": "t.parquet", "val": "v.parquet", "tokenizer": "tok"}
    for method in cfg.methods:  # every run's RunConfig loads and its algorithm settings validate
        run = load_config(None, run_overrides(cfg, paths, "ckpt", Path("/tmp/x"), method, cfg.seeds[0]))
        validate_algorithm_config(run.algorithm)
