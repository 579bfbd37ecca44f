"""`megatron-apo eval` on a Megatron checkpoint (exported to HF on the fly) and through the Ray rollout fleet.

Both must give exactly the samples of the plain in-process run on the HF folder: the export is lossless
(fp32) and the engines seed every (prompt, sample) the same way however the work is spread.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apo.data import write_toy_parquet
from tests.helpers.tiny_hf import build_tiny_model_folder

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ckpt")
    model = build_tiny_model_folder(root / "hf", seed=1)
    data = write_toy_parquet(root / "toy.parquet", 4, seed=2, k_values=(1,), min_solutions=1)
    ref = _eval(model, data, root / "ref", "hf")
    return root, model, data, ref


def _eval(model, data, out, label, *extra):
    cmd = [sys.executable, "-m", "megatron_apo.cli", "eval", "--model", str(model), "--data", str(data), "--n", "8",
           "--max-new-tokens", "2", "--out", str(out), "--label", label, "--reward-workers", "0", *map(str, extra)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "pass_at_k.json").read_text())


def test_eval_megatron_checkpoint_matches_hf(setup):
    from megatron_apo.models.convert import convert_hf_to_megatron

    root, model, data, ref = setup
    convert_hf_to_megatron(model, root / "megatron", tp=1, progress=False)
    res = _eval(root / "megatron", data, root / "meg_eval", "megatron")
    assert res["per_prompt"] == ref["per_prompt"] and res["examples"] == ref["examples"]
    assert not (root / "meg_eval" / "hf_export").exists()  # the temporary export is cleaned up
    assert (root / "meg_eval" / "pass_at_k.png").stat().st_size > 10_000


def test_eval_through_ray_fleet_matches_in_process(setup):
    root, model, data, ref = setup
    res = _eval(model, data, root / "fleet_eval", "fleet", "--engines", 1)
    assert res["meta"]["engine"] == "ray fleet of 1 cpu engine(s)"
    assert res["per_prompt"] == ref["per_prompt"] and res["examples"] == ref["examples"]


def test_eval_refuses_an_unverified_megatron_checkpoint_unless_allowed(setup):
    """A Megatron checkpoint is code-equivalent: without its checksums.json, eval stops in one line naming
    --allow-unverified before any file is read; with the flag it evaluates as before."""
    import shutil

    from megatron_apo.models.convert import convert_hf_to_megatron

    root, model, data, ref = setup
    ckpt = root / "megatron_unverified"
    convert_hf_to_megatron(model, ckpt, tp=1, progress=False)
    manifests = list(ckpt.rglob("checksums.json"))
    assert manifests
    for m in manifests:
        m.unlink()
    cmd = [sys.executable, "-m", "megatron_apo.cli", "eval", "--model", str(ckpt), "--data", str(data), "--n", "2",
           "--max-new-tokens", "2", "--out", str(root / "refused"), "--reward-workers", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--allow-unverified" in proc.stderr, proc.stderr
    assert not (root / "refused").exists()
    res = _eval(ckpt, data, root / "allowed", "megatron", "--allow-unverified")
    assert res["per_prompt"] == ref["per_prompt"]
    shutil.rmtree(root / "allowed")
