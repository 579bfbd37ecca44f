"""The README's demo table is the one `megatron-apo demo` prints (same format, same rows), docs/science.md carries
the same table, and its difference row is APO minus GRPO."""

import re
from pathlib import Path

from megatron_apo.study.demo import DIFF_LABEL, DemoConfig, format_demo_table

REPO = Path(__file__).resolve().parents[2]


def _demo_table(text: str) -> str:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| run | trained pass@1 | trained hard pass@16"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def _parse(table: str) -> dict:
    cfg = DemoConfig()
    out = {}
    for row in table.splitlines()[2:]:
        label, *cells = [c.strip() for c in row.strip("|").split("|")]
        nums = [[float(x) for x in re.findall(r"[-+]?\d+\.\d+", c)] for c in cells]
        out[label] = {split: {f"pass@{k}": n} for (split, k), n in zip(cfg.columns, nums)}
    return out


def test_readme_demo_table_is_what_the_demo_prints_and_docs_agree():
    readme = _demo_table((REPO / "README.md").read_text())
    science = _demo_table((REPO / "docs" / "science.md").read_text())
    assert readme == science
    table = _parse(readme)
    assert list(table) == ["reference", "grpo", "apo", DIFF_LABEL]
    assert format_demo_table(table, DemoConfig()) == readme  # the printed format, cell for cell
    for split, k in DemoConfig().columns:
        key = f"pass@{k}"
        want = table["apo"][split][key][0] - table["grpo"][split][key][0]
        assert abs(table[DIFF_LABEL][split][key][0] - want) <= 0.0011, split  # each printed to 3 decimals
