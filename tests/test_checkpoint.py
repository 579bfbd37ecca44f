"""dist_checkpointing training checkpoints: resume with a different data-parallel size continues exactly."""

import pytest

from megatron_apo.parallel import run_distributed
from megatron_apo.trainer.checkpoint import latest_checkpoint, list_checkpoints, read_metadata, resolve_checkpoint
from checkpoint_bodies import train_save_or_resume


def test_resume_with_a_different_dp_size(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    after_save = run_distributed(train_save_or_resume, 2, 2, ckpt, True, timeout=240)[0]  # TP=2, DP=1
    resumed = run_distributed(train_save_or_resume, 4, 2, ckpt, False, timeout=300)  # TP=2, DP=2
    # Every DP replica sees the same batch here, so each continues like the saver; only the grad-norm sum for
    # clipping is reduced in another order over the DP shards (relative differences ~1e-5 measured).
    for r in resumed:
        assert r == pytest.approx(after_save, rel=1e-4, abs=0)
    assert read_metadata(ckpt)["step"] == 2 and latest_checkpoint(ckpt).name == "iter_0000002"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "2"  # Megatron-LM's convention: the step
    assert [p.name for p in list_checkpoints(ckpt)] == ["iter_0000002"]


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a Megatron checkpoint"):
        resolve_checkpoint(tmp_path)
