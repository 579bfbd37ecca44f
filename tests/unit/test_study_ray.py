"""The study's shared Ray cluster: every run's overrides name it, a cluster of the user's wins, and a study whose
`rl` names one starts none (tests/e2e/test_study.py runs the real cluster)."""

from pathlib import Path

from megatron_apo.study.config import StudyConfig
from megatron_apo.study.runner import StudyRay, run_overrides

PATHS = {"model": "m.yaml", "train": "t.parquet", "val": "v.parquet", "tokenizer": "sp.model"}


def _cfg(rl: list[str], method: list[str]) -> StudyConfig:
    return StudyConfig(rl=rl, methods={"grpo": method})


def test_runs_attach_to_the_study_cluster_unless_the_user_names_one():
    cfg = _cfg(["trainer.total_steps=2"], ["algorithm.loss_mode=vanilla"])
    o = run_overrides(cfg, PATHS, "ref", Path("run"), "grpo", 1, "127.0.0.1:6379")
    assert [x for x in o if x.startswith("rollout.ray_address=")] == ["rollout.ray_address=127.0.0.1:6379"]
    assert not any(x.startswith("rollout.ray_address") for x in run_overrides(cfg, PATHS, "ref", Path("r"), "grpo", 1))
    # a method's own cluster comes after the study's: the later override wins
    cfg = _cfg([], ["rollout.ray_address=10.0.0.1:6379"])
    o = run_overrides(cfg, PATHS, "ref", Path("run"), "grpo", 1, "127.0.0.1:6379")
    assert o.index("rollout.ray_address=10.0.0.1:6379") > o.index("rollout.ray_address=127.0.0.1:6379")


def test_no_study_cluster_when_rl_names_one():
    import ray

    before = ray.is_initialized()  # the suite's own session cluster may be up
    cluster = StudyRay(_cfg(["rollout.ray_address=10.0.0.1:6379"], []))
    assert cluster.get(lambda: []) is None and ray.is_initialized() == before  # nothing was started
    cluster.close()
    assert StudyRay(_cfg(["trainer.total_steps=2"], [])).user_address is False


def test_gpu_engines_keep_a_cluster_per_run(monkeypatch):
    """vLLM on a GPU node: each run's own cluster gets the GPUs its ranks leave free (and its pre-start checks)."""
    import types

    import ray

    import megatron_apo.rollout.placement as placement

    monkeypatch.setattr(placement, "node_gpu_count", lambda: 2)  # the node's GPU count, as the driver reports it
    run = types.SimpleNamespace(rollout=types.SimpleNamespace(engine="vllm", num_engines=1))
    before = ray.is_initialized()  # the suite's own session cluster may be up
    cluster = StudyRay(_cfg([], []))
    assert cluster.get(lambda: [run]) is None and cluster.per_run and ray.is_initialized() == before
