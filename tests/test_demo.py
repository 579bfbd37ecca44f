"""The README's first command, scaled down: `megatron-apo demo --quick` runs every stage and writes its outputs."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "demo", "--quick", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"reference", "grpo", "apo"}
    for method, table in results.items():
        assert set(table) == {"pass@1", "pass@2", "pass@4"}, method
        vals = [table[f"pass@{k}"] for k in (1, 2, 4)]
        assert all(0.0 <= v <= 1.0 for v in vals) and vals == sorted(vals)  # pass@k never falls as k grows
    png = out / "pass_at_k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "pass@1" in r.stdout and "reference" in r.stdout and "done in" in r.stdout
    assert (out / "sft" / "latest").read_text().strip() == str(30)  # the quick SFT's 30 steps, checkpointed
