"""The README's first command, scaled down: `megatron-apo demo --quick` runs every stage and writes its outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here takes more than ~10 s on 2 cores

REPO = Path(__file__).resolve().parents[2]


def test_quick_demo_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "demo", "--quick", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"reference", "grpo", "apo", "apo - grpo"}
    for label, table in results.items():
        # the guard (trained pass@1) and the study's two hard endpoints at the quick demo's k = 4
        assert {s: set(c) for s, c in table.items()} == {"trained": {"pass@1"}, "trained_hard": {"pass@4"},
                                                         "heldout_hard": {"pass@4"}}, label
        for split, cells in table.items():
            for est, lo, hi in cells.values():
                assert lo <= est + 1e-12 and est <= hi + 1e-12, (label, split)
                assert (-1.0 <= lo and hi <= 1.0) if label == "apo - grpo" else (0.0 <= lo and hi <= 1.0)
    diff = results["apo - grpo"]["heldout_hard"]["pass@4"][0]
    want = results["apo"]["heldout_hard"]["pass@4"][0] - results["grpo"]["heldout_hard"]["pass@4"][0]
    assert abs(diff - want) < 1e-9
    for png in ("pass_at_k.png", "dynamics.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "pass@1" in r.stdout and "reference" in r.stdout and "APO - GRPO there is" in r.stdout
    assert "done in" in r.stdout
    assert (out / "inst_0" / "sft" / "latest").read_text().strip() == str(30)  # the quick SFT's 30 steps
    # what a user sees: no warnings from the libraries underneath (known-harmless ones are silenced at the source)
    noisy = [ln for ln in (r.stdout + r.stderr).splitlines() if "Warning" in ln or "WARNING" in ln]
    assert not noisy, noisy
