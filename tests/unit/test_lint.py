"""`ruff check` (configured in pyproject.toml: pycodestyle, pyflakes, import order at 120 columns) is clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_ruff_check_is_clean():
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        pytest.fail("ruff not found: it comes with the dev extra")
    r = subprocess.run([exe, "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
