"""The image's package set and the `gpu` extra resolve: pip's resolver in dry run, for the image's Python 3.12 on
manylinux x86_64 (glibc 2.39, the NGC base's Ubuntu 24.04), against the package index.

A conflict such as vLLM's `prometheus-fastapi-instrumentator>=8` against leptonai's `==7.0.0` (NeMo-Run's
dependency) fails here instead of in a `docker build`. Marked `network` (CI reaches the index) and `slow` (about a
minute: pip reads the PEP 658 metadata files, it downloads no wheel). Wheels only (`--only-binary=:all:`), so
nothing is built. Excluded, and why: transformer-engine's `pytorch` extra (`transformer_engine_torch`) is published
as an sdist only; its metadata needs a build against torch, and the image compiles it against the torch installed
before it (`--no-build-isolation`). The rest of Transformer Engine (`transformer-engine[core_cu13]`, the
`transformer_engine_cu13` wheel) is resolved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.unit.test_dockerfile import DOCKERFILE, REPO, dockerfile_pip_requirements

PYTHON = "3.12"
# pip takes each platform tag literally: every manylinux level up to the base image's glibc (2.39) is listed
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]
SDIST_ONLY_EXTRAS = {"transformer-engine": {"pytorch"}}  # transformer_engine_torch: see the module docstring


def wheel_only(reqs: list[str]) -> list[str]:
    """The requirements with the extras that exist only as sdists removed (SDIST_ONLY_EXTRAS)."""
    out = []
    for text in reqs:
        r = Requirement(text)
        drop = SDIST_ONLY_EXTRAS.get(canonicalize_name(r.name), set())
        if r.extras & drop:
            r.extras = r.extras - drop
        out.append(str(r))
    return out


def image_requirements() -> list[str]:
    """What the Dockerfile's pip layers install: its named packages, then the project's own dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return wheel_only([str(r) for r in dockerfile_pip_requirements(DOCKERFILE.read_text())] + project["dependencies"])


def gpu_extra_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return wheel_only(project["dependencies"] + project["optional-dependencies"]["gpu"])


def resolver(reqs: list[str], report: str) -> subprocess.Popen:
    # --isolated: no pip.conf, no PIP_* variables (a local constraint file or wheel folder must not decide this)
    index = os.environ.get("MEGATRON_APO_INDEX_URL", "https://pypi.org/simple")
    cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", report, "--index-url", index, "--only-binary=:all:", "--python-version", PYTHON,
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return subprocess.Popen(cmd + reqs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sdist_only_extras_are_the_only_thing_left_out():
    reqs = image_requirements()
    assert 'transformer-engine[core_cu13]==2.11.0' in reqs
    assert len(reqs) == len(dockerfile_pip_requirements(DOCKERFILE.read_text())) + len(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


@pytest.mark.network
@pytest.mark.slow
def test_image_and_gpu_extra_resolve(tmp_path):
    sets = {"image": image_requirements(), "gpu extra": gpu_extra_requirements()}
    procs = {name: resolver(reqs, str(tmp_path / f"{i}.json")) for i, (name, reqs) in enumerate(sets.items())}
    failures = []
    for i, (name, proc) in enumerate(procs.items()):
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{name} does not resolve:\n{out[-3000:]}")
            continue
        installed = {canonicalize_name(p["metadata"]["name"]): p["metadata"]["version"]
                     for p in json.loads((tmp_path / f"{i}.json").read_text())["install"]}
        assert installed["torch"] == "2.13.0" and installed["vllm"] == "0.32.0", (name, installed.get("torch"))
        assert installed["megatron-core"] == "0.16.1" and installed["transformer-engine-cu13"] == "2.11.0", name
    assert not failures, "\n".join(failures)
