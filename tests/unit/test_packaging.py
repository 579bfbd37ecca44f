"""A non-editable install (a built wheel) carries everything the CLI needs: the model configs, py.typed, the license."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_runs_plan_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("megatron_apo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "megatron_apo/model_configs/qwen2.5-7b.yaml" in names and "megatron_apo/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(n for n in names if "dist-info" in n)
    # install it into a plain folder and run its console script from elsewhere: the checkout is not importable there
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", "import megatron_apo; print(megatron_apo.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().startswith(str(target)), probe.stdout + probe.stderr
    r = subprocess.run([sys.executable, str(target / "bin" / "megatron-apo"), "plan", "--model", "qwen2.5-7b", "--gpus",
                        "8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recommended: trainer" in r.stdout
