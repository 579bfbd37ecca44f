"""A reward function that kills its process ends `megatron-apo train` with one line naming data.reward_fn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.rl_setup import overrides, toy_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_reward_that_exits_is_one_line_naming_data_reward_fn(tmp_path):
    env = toy_env(tmp_path / "toy")
    reward = tmp_path / "exits.py"
    reward.write_text("import os\n"
                      "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    os._exit(3)\n")
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train",
                        *overrides(env, tmp_path / "run", tp=1, steps=1,
                                   extra=[f"data.reward_fn={reward}:compute_score", "data.reward_workers=1"])],
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"megatron-apo train: error: data.reward_fn={reward}:compute_score: the reward worker "
                            "process died 3 times in a row (last exit code 3: os._exit"), error
    assert "data.reward_max_error_frac=0.5" in error
