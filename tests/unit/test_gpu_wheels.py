"""`scripts/gpu_wheels.sh` (markers `network`, `slow`: it downloads from the package index, which CI reaches): its
folder for the bare GPU machine (cp312) stays under 60 MiB and holds megatron-core without torch; and its wheels
cover every import `scripts/gpu_check.sh --wheels` makes. For the second, the same list is fetched for this
machine's Python and installed with `--no-index` into a private target, as the check does, and
tests/helpers/bare_check_probe.py runs in an interpreter that sees only that target and what a bare GPU machine has
(torch, transformers, safetensors, numpy, pytest and their requirements, linked from this environment)."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
BARE = ("torch", "transformers", "safetensors", "numpy", "pytest", "pip")  # what the GPU machine has
pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(1200)]


def wheels(folder: Path, py_version: str) -> list[Path]:
    env = {**os.environ, "PY_VERSION": py_version, "PYTHON": sys.executable}
    r = subprocess.run(["bash", "scripts/gpu_wheels.sh", str(folder)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return sorted(folder.glob("*.whl"))


def test_the_folder_for_the_gpu_machine(tmp_path):
    found = wheels(tmp_path / "w", "3.12")
    size = sum(p.stat().st_size for p in found)
    assert size <= 60 * 2**20, f"{size / 2**20:.1f} MiB"
    names = {canonicalize_name(p.name.split("-")[0]) for p in found}
    assert "megatron-core" in names and not names & {"torch", "numpy", "transformers", "triton"}, names
    (mcore,) = [p for p in found if p.name.startswith("megatron_core-0.16.1-")]
    assert "cp312" in mcore.name and "manylinux" in mcore.name


def bare_closure() -> set[str]:
    """The distributions a bare GPU machine has: BARE and their requirements (no extras), as installed here."""
    seen, todo = set(), list(BARE)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def link_bare_site(dest: Path) -> None:
    """A folder with links to the top-level files of the bare distributions (their code and their dist-info)."""
    dest.mkdir()
    for name in bare_closure():
        dist = md.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (dest / top).exists() and (site / top).exists():
                (dest / top).symlink_to(site / top)


def test_the_wheels_cover_the_checks_imports(tmp_path):
    found = wheels(tmp_path / "w", f"{sys.version_info.major}.{sys.version_info.minor}")
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(target), *map(str, found)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    link_bare_site(tmp_path / "bare")
    # -S: no site-packages at all, only PYTHONPATH (and the spawned ranks inherit both)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(target), str(tmp_path / "bare")]),
           "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-S", "tests/helpers/bare_check_probe.py"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0 and r.stdout.strip().endswith("probe: ok"), r.stdout[-3000:] + r.stderr[-5000:]
