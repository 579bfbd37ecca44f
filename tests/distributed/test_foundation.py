"""The multi-process harness, distributed init, config loading and the CLI skeleton."""

import subprocess
import sys

import pytest
import torch

from megatron_apo.config import ConfigError, RunConfig, load_config
from megatron_apo.parallel import DistributedError, run_distributed


def _allreduce_rank(value):
    import torch.distributed as dist

    from megatron_apo.parallel import init_distributed

    init_distributed()
    t = torch.tensor([float(dist.get_rank() + value)])
    dist.all_reduce(t)
    return dist.get_world_size(), t.item()


def _fails_on_rank_one():
    import os

    if os.environ["RANK"] == "1":
        raise RuntimeError("boom on rank one")
    return "ok"


def _hangs():
    import time

    time.sleep(60)


def test_harness_runs_gloo_group():
    out = run_distributed(_allreduce_rank, 3, 10, timeout=60)
    assert out == [(3, 33.0)] * 3


def test_harness_surfaces_child_traceback():
    with pytest.raises(DistributedError, match="boom on rank one") as e:
        run_distributed(_fails_on_rank_one, 2, timeout=60)
    assert "rank 1" in str(e.value)


def _bad_config_on_rank_one():
    import os

    from megatron_apo.config import ConfigError

    if os.environ["RANK"] == "1":
        raise ConfigError("checkpoint.load: this checkpoint's model is not model.config")


def test_a_rank_user_error_is_raised_as_itself():
    """A user's mistake found only inside the ranks stays a one-line error at the CLI, not a DistributedError."""
    from megatron_apo.config import ConfigError

    with pytest.raises(ConfigError, match="this checkpoint's model is not model.config") as e:
        run_distributed(_bad_config_on_rank_one, 2, timeout=60)
    assert not isinstance(e.value, DistributedError) and "Traceback" not in str(e.value)


@pytest.mark.slow
def test_harness_times_out_naming_ranks():
    with pytest.raises(DistributedError, match=r"ranks \[0\] did not finish within 3s"):
        run_distributed(_hangs, 1, timeout=3)


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(overrides=["algorithm.apo_topk=16", "parallel.tensor_model_parallel_size=2"])
    assert isinstance(cfg, RunConfig) and cfg.algorithm.apo_topk == 16 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.algorithm.apo_push_coeff == 1.05 and cfg.algorithm.apo_pull_coeff == 0.1
    f = tmp_path / "run.yaml"
    f.write_text("algorithm:\n  loss_mode: vanilla\n  apo_top_k: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown config key 'algorithm.apo_top_k'"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="apo_topk"):
        load_config(overrides=["algorithm.apo_topk=many"])


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("train", "eval", "convert", "plan", "demo", "smoke"):
        assert cmd in out


def test_cli_bad_input_is_one_line():
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "smoke", "--tp", "3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "does not divide num_query_groups" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_smoke_tp2_loss_falls():
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "smoke", "--tp", "2", "--steps", "12"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "falling" in r.stdout and "NOT falling" not in r.stdout
