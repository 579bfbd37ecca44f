"""scripts/slurm_local.sh from a fresh machine's state, and its error reporting.

The real-cluster tests (test_slurm.py, test_nemo_run.py) use the default cluster, which on a developer's machine is
usually already configured. These tests point the script at an empty config folder and an empty state folder
(SLURM_LOCAL_ETC / SLURM_LOCAL_DIR, with every port shifted) so that the path a brand-new machine takes, where
/etc/slurm/slurm.conf does not exist yet, runs every time; the extra cluster is stopped again at the end.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "scripts" / "slurm_local.sh")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="scripts/slurm_local.sh runs as root only")


def run_script(action: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, action], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


@needs_root
def test_a_failing_step_names_its_line_and_command(tmp_path):
    """Under `set -e` a failing command used to end the script silently; now it says which line and command."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_script("up", SLURM_LOCAL_DIR=str(blocker / "state"))
    assert r.returncode != 0
    assert re.search(r'error: line \d+: `mkdir -p "\$STATE"` exited with status 1', r.stderr), r.stderr


@pytest.mark.slurm
@needs_root
def test_up_from_an_empty_config_folder_reaches_up():
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no apt-get and no Slurm installed: cannot start a local Slurm cluster")
    # short paths: mariadb's unix socket lives under the state folder (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="apo-fresh-"))
    env = dict(SLURM_LOCAL_ETC=str(root / "etc"), SLURM_LOCAL_DIR=str(root / "state"), SLURM_LOCAL_PORT_OFFSET="400",
               SLURM_LOCAL_CLUSTER="apo-fresh", SLURM_LOCAL_NODE_PREFIX="apo-f")
    assert not (root / "etc" / "slurm.conf").exists()
    try:
        r = run_script("up", **env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "up: cluster apo-fresh, nodes apo-f1 apo-f2" in r.stderr
        conf = (root / "etc" / "slurm.conf").read_text()
        assert "written by megatron-apo scripts/slurm_local.sh" in conf and "SlurmctldPort=17217" in conf
        assert run_script("status", **env).returncode == 0
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env={**os.environ,
                               "SLURM_CONF": str(root / "etc" / "slurm.conf")}, capture_output=True, text=True,
                               timeout=60).stdout.split("\n")
        assert sorted(n.split()[0] for n in nodes if n.strip()) == ["apo-f1", "apo-f2"]
        # a failure inside a function reports the same way (the config folder cannot be created)
        blocker = root / "a-file"
        blocker.write_text("x")
        bad = run_script("up", **{**env, "SLURM_LOCAL_ETC": str(blocker / "etc")})
        assert bad.returncode != 0
        assert re.search(r'error: line \d+: `mkdir -p "\$ETC"', bad.stderr), bad.stderr
    finally:
        down = run_script("down", **env)
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, down.stderr
