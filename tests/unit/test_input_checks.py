"""Inputs that used to fail deep inside the ranks or engines are one line before anything starts: a tokenizer
larger than the model, a negative or non-finite learning rate, an out_dir name the filesystem refuses,
`smoke --tp 0`, and `eval --n` past its bound."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_apo.config import ConfigError, InputError, load_config
from megatron_apo.data import write_verl_parquet
from megatron_apo.models import load_model_config
from megatron_apo.trainer.validation import check_path_fits, validate_run_config
from tests.helpers.tiny_hf import build_char_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    build_char_tokenizer(root / "tok")
    row = {"data_source": "toy_digit_sum", "prompt": [{"role": "user", "content": "k=2 sum=3 :"}],
           "reward_model": {"ground_truth": "3", "style": "rule"}, "extra_info": {"k": 2}}
    write_verl_parquet([row], root / "train.parquet")
    tiny = load_model_config("tiny").to_dict()
    for name, vocab in (("small", 8), ("fits", 250)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(dict(tiny, name=f"tiny-{name}", vocab_size=vocab)))
    return root


def _overrides(root: Path, model: str, *extra: str) -> list[str]:
    return [f"model.config={root / model}.yaml", f"data.train_files=[{root / 'train.parquet'}]",
            f"data.tokenizer={root / 'tok'}", "parallel.tensor_model_parallel_size=1",
            f"out_dir={root / 'out'}", *extra]


def test_tokenizer_larger_than_the_model_is_one_line(inputs):
    validate_run_config(load_config(None, _overrides(inputs, "fits")), 1)
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*tok has \d+ tokens but model tiny-small has "
                                          r"vocab_size=8; use the model's own tokenizer"):
        validate_run_config(load_config(None, _overrides(inputs, "small")), 1)


@pytest.mark.parametrize("value", ["-1e-6", "nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["lr", "min_lr"])
def test_learning_rate_must_be_finite_and_non_negative(key, value):
    with pytest.raises(ConfigError, match=f"trainer.{key} must be a finite number >= 0, got "):
        load_config(None, [f"trainer.{key}={value}"])
    assert load_config(None, [f"trainer.{key}=0"]).trainer.validate() is None


def test_out_dir_names_the_filesystem_refuses(inputs, tmp_path):
    check_path_fits("out_dir", tmp_path / "run")
    with pytest.raises(ConfigError, match=r"out_dir: the path component 'xxx.*is 300 bytes, more than the "
                                          r"filesystem allows \(255\); choose a shorter out_dir"):
        check_path_fits("out_dir", tmp_path / ("x" * 300) / "run")
    with pytest.raises(ConfigError, match="out_dir: .*exceeds the filesystem's 4096"):
        check_path_fits("out_dir", tmp_path.joinpath(*["y" * 200] * 25))
    cfg = load_config(None, _overrides(inputs, "fits", f"checkpoint.dir={tmp_path / ('c' * 256)}"))
    with pytest.raises(ConfigError, match="checkpoint.dir: the path component"):
        validate_run_config(cfg, 1)


def test_model_validate_refuses_sizes_below_one():
    for kw, what in (({"tensor_parallel_size": 0}, "tensor"), ({"pipeline_parallel_size": 0}, "pipeline"),
                     ({"expert_parallel_size": 0}, "expert")):
        with pytest.raises(InputError, match=f"{what} parallel size must be >= 1, got 0"):
            load_model_config("tiny").validate(**kw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_apo.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["smoke", "--tp", "0"], "megatron-apo smoke: error: --tp must be >= 1, got 0"),
    (["smoke", "--dp", "-1"], "megatron-apo smoke: error: --dp must be >= 1, got -1"),
    (["eval", "--out", "{tmp}/e", "--n", "100000"], "megatron-apo eval: error: --n 100000: samples per prompt must "
                                                     "be in [1, 4096]"),
    (["eval", "--out", "{tmp}/e", "--n", "0"], "samples per prompt must be in [1, 4096]"),
    (["eval", "--out", "{tmp}/e", "--prompts-per-call", "0"], "--prompts-per-call must be >= 1, got 0"),
])
def test_cli_argument_errors_are_one_line(tmp_path, args, message):
    r = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("extra, message", [
    (["trainer.lr=-0.001"], "trainer.lr must be a finite number >= 0, got -0.001"),
    (["trainer.min_lr=nan"], "trainer.min_lr must be a finite number >= 0, got nan"),
    ([], "out_dir: the path component"),
])
def test_train_cli_input_errors_are_one_line_and_leave_no_lock(inputs, tmp_path, extra, message):
    out = tmp_path / ("o" * 300 if not extra else "run")
    r = _cli("train", *_overrides(inputs, "fits", f"out_dir={out}", *extra))
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
