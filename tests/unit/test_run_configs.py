"""The shipped run configs load, name real model configs, and pass every check that needs no data on disk."""

from pathlib import Path

import pytest

from megatron_apo.algorithms.registry import import_loss_modules, resolve_algorithm_config
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
    resolve_algorithm_config(cfg.algorithm)  # validates, and checks loss_mode against the registry
    assert cfg.algorithm.loss_mode == "apo_ratio" and cfg.rollout.engine == "vllm"


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"apo_qwen2.5_32b.yaml", "apo_qwen2.5_7b.yaml", "qwen3_30b_a3b_apo.yaml",
                                         "qwen3_235b_a22b_apo.yaml"}


# the MoE examples: the cluster each header names and the planner settings it matches (trainer settings agree)
MOE_EXAMPLES = {
    "qwen3_30b_a3b_apo.yaml": (24, {}),
    "qwen3_235b_a22b_apo.yaml": (72, {"reference_offload": True, "recompute": "full"}),
}


@pytest.mark.parametrize("name", sorted(MOE_EXAMPLES))
def test_moe_configs_are_the_planners_recommendation(name):
    from megatron_apo.launch.planner import Cluster, Workload, plan

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
    gpus, settings = MOE_EXAMPLES[name]
    seq = cfg.data.max_prompt_length + cfg.data.max_response_length
    p = plan(load_model_config(cfg.model.config), Cluster(num_gpus=gpus), Workload(seq_length=seq, **settings))
    r, par = p.recommended, cfg.parallel
    assert (r.tp, r.pp, r.ep) == (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                  par.expert_model_parallel_size)
    assert (p.fleet_engines, p.fleet.tp) == (cfg.rollout.num_engines, cfg.rollout.engine_tp)
    par.validate(p.trainer_gpus)  # Megatron's TP x PP x EP grid on the trainer's ranks
    assert cfg.trainer.ref_cpu_offload == settings.get("reference_offload", False)
    assert cfg.trainer.recompute == settings.get("recompute", "none")
    assert f"--gpus {gpus}" in (Path(__file__).resolve().parents[2] / "configs" / name).read_text()


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_config_is_consistent(path):
    from megatron_apo.study import load_study_config
    from megatron_apo.study.runner import run_overrides

    cfg = load_study_config(path)
    paths = {"model": cfg.task.model, "train": "t.parquet", "val": "v.parquet", "tokenizer": "tok"}
    for method in cfg.methods:  # every run's RunConfig loads and its algorithm settings validate
        run = load_config(None, run_overrides(cfg, paths, "ckpt", Path("/tmp/x"), method, cfg.seeds[0]))
        import_loss_modules(run.algorithm)  # e.g. the study's controls (megatron_apo.study.controls)
        resolve_algorithm_config(run.algorithm)
