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
    assert set(results) == {"reference", "grpo", "apo"}
    for method, table in results.items():
        assert set(table) == {"trained", "heldout_easy", "heldout_hard"}, method
        for split, cells in table.items():
            assert set(cells) == {"pass@1", "pass@4"}, (method, split)
            (p1, lo1, hi1), (p4, lo4, hi4) = cells["pass@1"], cells["pass@4"]
            assert 0.0 <= lo1 <= p1 <= hi1 <= 1.0 and 0.0 <= lo4 <= p4 <= hi4 <= 1.0
            assert p1 <= p4 + 1e-12  # pass@k never falls as k grows
    for png in ("pass_at_k.png", "dynamics.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "pass@1" in r.stdout and "reference" in r.stdout and "The figure shows" in r.stdout and "done in" in r.stdout
    assert (out / "sft" / "latest").read_text().strip() == str(30)
    # what a user sees: no warnings from the libraries underneath (known-harmless ones are silenced at the source)
    noisy = [ln for ln in (r.stdout + r.stderr).splitlines() if "Warning" in ln or "WARNING" in ln]
    assert not noisy, noisy  # the quick SFT's 30 steps, checkpointed
