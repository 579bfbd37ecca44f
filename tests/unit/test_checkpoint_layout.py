"""The checkpoint layout's one owner, the launch environment, the resume config guard, the metrics replay, and the
out_dir lock check: fast checks without a process group."""

from __future__ import annotations

import json

import pytest

from megatron_apo.config import ConfigError, load_config
from megatron_apo.launch_env import launch_env, rank_env
from megatron_apo.models.megatron_checkpoint import iter_dir_name, read_latest, resolve_checkpoint
from megatron_apo.trainer.checkpoint import _first_line, latest_checkpoint, list_checkpoints
from megatron_apo.trainer.config_guard import check_resume_config, checkpoint_record
from megatron_apo.trainer.metrics import MetricsLogger, read_metrics
from megatron_apo.trainer.runlock import LOCK_NAME, OutDirLock, OutDirLocked, check_out_dir_free


def _fake_iter(ckpt, step: int):
    it = ckpt / iter_dir_name(step)
    (it / "model").mkdir(parents=True)
    (it / "megatron_apo.json").write_text(json.dumps({"step": step}))
    return it


def test_an_eight_digit_iteration_is_a_checkpoint(tmp_path):
    """Step 10,000,000 gets iter_10000000 (8 digits); training and conversion both see it."""
    ckpt = tmp_path / "ckpt"
    _fake_iter(ckpt, 9_999_999)
    big = _fake_iter(ckpt, 10_000_000)
    assert big.name == "iter_10000000"
    assert list_checkpoints(ckpt)[-1] == big
    assert latest_checkpoint(ckpt) == big == resolve_checkpoint(ckpt)
    (ckpt / "latest").write_text("10000000\n")
    assert resolve_checkpoint(ckpt) == big


def test_latest_file_and_error_text_use_their_first_line(tmp_path):
    (tmp_path / "latest").write_text("7\nleftover\n")
    assert read_latest(tmp_path) == (tmp_path / "latest", "7")
    assert _first_line(ValueError("what happened\n  where: deep inside\n")) == "what happened"


def test_launch_env_reads_torchrun_then_srun():
    assert launch_env({}) == launch_env({"UNRELATED": "1"})
    assert not launch_env({}).launched and launch_env({}).rank == 0
    srun = launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (srun.launched, srun.rank, srun.world_size, srun.local_rank) == (True, 3, 8, 1)
    both = launch_env({"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"})
    assert (both.rank, both.world_size) == (2, 4)  # torchrun inside an allocation: its own numbering
    assert launch_env(rank_env(1, 2, 29500)).rank == 1


@pytest.mark.parametrize("change, key", [("trainer.lr=5e-3", "trainer.lr"),
                                         ("algorithm.loss_mode=vanilla", "algorithm.loss_mode"),
                                         ("rollout.n=2", "rollout.n"),
                                         ("data.train_batch_size=2", "data.train_batch_size")])
def test_resume_with_a_changed_config_is_refused_naming_the_key(change, key):
    meta = checkpoint_record(load_config(None, []))
    json.dumps(meta)  # stored in megatron_apo.json
    assert check_resume_config(meta, load_config(None, ["trainer.total_steps=99", "trainer.progress=false"]),
                               "ckpt") == []  # a longer run, another progress bar: not a change
    with pytest.raises(ConfigError, match=f"{key}: .* -> .*checkpoint.allow_config_change=true"):
        check_resume_config(meta, load_config(None, [change]), "ckpt")
    allowed = check_resume_config(meta, load_config(None, [change, "checkpoint.allow_config_change=true"]), "ckpt")
    assert [c.split(":")[0] for c in allowed] == [key]


def test_a_lost_metrics_record_is_replayed_from_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=3, tensorboard=False, progress=False)
    log.log(1, {"loss": 1.0})
    saved = log.record(2, {"loss": 0.5})  # the step-2 checkpoint holds this; the kill came before the write
    log.close()
    log = MetricsLogger(tmp_path, total_steps=3, start_step=2, tensorboard=False, progress=False)
    assert log.replay(saved) and not log.replay(saved)  # once only
    log.log(3, {"loss": 0.25})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_out_dir_check_creates_nothing(tmp_path):
    out = tmp_path / "run"
    check_out_dir_free(out)  # a run that then fails validation must leave no lock file (nor the folder)
    assert not out.exists()
    held = OutDirLock(out).acquire()
    with pytest.raises(OutDirLocked):
        check_out_dir_free(out)
    held.release()
    check_out_dir_free(out)
    assert (out / LOCK_NAME).is_file()


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    """What a checkpoint stores per rank loads with torch.load(weights_only=True) and restores every generator."""
    import random

    import numpy as np
    import torch

    from megatron_apo.trainer.checkpoint import _rng_state, _set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian is part of numpy's state
    torch.save(_rng_state(), tmp_path / "rank_00000.pt")
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    _set_rng_state(torch.load(tmp_path / "rank_00000.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want
