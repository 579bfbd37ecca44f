"""The run config's schema: choice fields are str Enums checked at merge, range checks live with their sections,
the trainer section is the optimizer config, and the CLI turns only user errors into one line."""

from __future__ import annotations

import dataclasses
import pickle
import re
import subprocess
import sys

import pytest

from megatron_apo.config import (
    ConfigError,
    DType,
    LossAggMode,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainerSection,
    UserError,
    load_config,
)
from megatron_apo.dtypes import DTYPE_NAMES


@pytest.mark.parametrize("key, bad, valid", [
    ("algorithm.loss_agg_mode", "bogus", "token-mean, seq-mean-token-sum"),
    ("algorithm.kl_loss_type", "k4", "low_var_kl"),
    ("algorithm.adv_calibration", "inverse", "none, inverse_success"),
    ("model.params_dtype", "int8", "bf16"),
    ("model.transformer_impl", "te", "transformer_engine, local"),
    ("data.on_invalid", "ignore", "error, skip"),
    ("trainer.lr_decay_style", "step", "constant, linear, cosine"),
    ("rollout.sync_dtype", "int8", "float32"),
])
def test_a_bad_choice_is_one_line_naming_key_and_values(key, bad, valid):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={bad}"])
    msg = str(e.value)
    assert "\n" not in msg and repr(key) in msg and repr(bad) in msg and valid in msg, msg


def test_choices_compare_print_and_pickle_as_their_values():
    cfg = load_config(None, ["algorithm.loss_agg_mode=seq-mean-token-sum", "model.params_dtype=bf16",
                             "model.transformer_impl=local"])
    a = cfg.algorithm
    assert a.loss_agg_mode == "seq-mean-token-sum" and a.loss_agg_mode is LossAggMode["seq-mean-token-sum"]
    assert f"{a.loss_agg_mode}" == str(a.loss_agg_mode) == "seq-mean-token-sum"
    assert DTYPE_NAMES[cfg.model.params_dtype] == "bfloat16"  # the aliases of the one dtype table stay valid
    assert {m.value for m in DType} == set(DTYPE_NAMES)
    assert cfg.model.transformer_impl == "local" and cfg.algorithm.loss_mode == "apo_ratio"  # a registry str
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # spawned ranks receive the config pickled


@pytest.mark.parametrize("override, message", [
    ("trainer.total_steps=0", "trainer.total_steps must be >= 1, got 0"),
    ("trainer.micro_batch_size=-1", "trainer.micro_batch_size must be >= 1"),
    ("data.train_batch_size=0", "data.train_batch_size must be >= 1"),
    ("rollout.n=0", "rollout.n must be >= 1"),
    ("algorithm.clip_ratio_low=1.5", "algorithm.clip_ratio_low=1.5"),
])
def test_range_checks_run_at_load(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_tis_cap_is_checked_only_off_policy():
    load_config(None, ["rollout.tis_cap=0.5"])
    with pytest.raises(ConfigError, match="rollout.tis_cap must be >= 1.0"):
        load_config(None, ["rollout.tis_cap=0.5", "rollout.one_step_off_policy=true"])


def test_a_choice_set_in_code_is_checked_by_validate():
    cfg = RunConfig()
    cfg.model.transformer_impl = "te"
    with pytest.raises(ConfigError, match=r"model\.transformer_impl='te' is unknown; use one of transformer_engine, "
                                          r"local \(or leave it unset\)"):
        cfg.validate()


def test_the_trainer_section_is_the_optimizer_config():
    t = load_config(None, ["trainer.lr=3e-4", "trainer.adam_beta2=0.95"]).trainer
    assert isinstance(t, OptimConfig) and (t.lr, t.adam_beta2) == (3e-4, 0.95)
    optim_keys = {f.name for f in dataclasses.fields(OptimConfig)}
    assert optim_keys <= {f.name for f in dataclasses.fields(TrainerSection)}
    assert {k: getattr(TrainerSection(), k) for k in optim_keys} == dataclasses.asdict(OptimConfig())


def test_user_errors_share_one_base():
    from megatron_apo.data.schema import InvalidDataError
    from megatron_apo.diskio import DiskError
    from megatron_apo.models.checksums import CheckpointCorrupt
    from megatron_apo.trainer.runlock import OutDirLocked

    for cls in (ConfigError, InvalidDataError, CheckpointCorrupt, DiskError, OutDirLocked):
        assert issubclass(cls, UserError), cls
    assert issubclass(ConfigError, ValueError)  # existing `except ValueError` callers keep working


_BUG = """
import sys
import megatron_apo.launch.planner as planner
from megatron_apo.cli import main

def plan(*args, **kwargs):
    raise ValueError("an internal bug deep inside")

planner.plan = plan
sys.exit(main(["plan", "--model", "tiny", "--gpus", "8"]))
"""


def test_an_internal_error_keeps_its_traceback():
    """A ValueError that is not a user error (a bug) is not flattened into the one-line `error:` message."""
    r = subprocess.run([sys.executable, "-c", _BUG], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" in r.stderr and "ValueError: an internal bug deep inside" in r.stderr, r.stderr
    assert "megatron-apo plan: error:" not in r.stderr


def test_a_user_error_is_one_line():
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "plan", "--model", "no-such-model", "--gpus", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("megatron-apo plan: error: model config 'no-such-model' not found")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value, message", [
    ("nccl_timeout_minutes", 0, "parallel.nccl_timeout_minutes must be >= 1 (minutes), got 0"),
    ("control_timeout_minutes", -5, "parallel.control_timeout_minutes must be >= 1 (minutes), got -5"),
    ("expert_model_parallel_size", 3, "world size 4 / PP 1 is not divisible by TP*EP = 6"),
])
def test_parallel_config_checks_its_ranges_and_the_grid(field, value, message):
    p = ParallelConfig(tensor_model_parallel_size=2, **{field: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        p.validate(world_size=4)
    ParallelConfig(tensor_model_parallel_size=2).validate(world_size=4)  # the defaults pass
