"""A local Ray cluster gets only the GPUs no trainer rank uses, and its actors see exactly those.

Ray takes GPU ids from CUDA_VISIBLE_DEVICES when its node starts and trusts a `num_gpus` it is given, so faked
GPUs on a CPU machine exercise the real hand-over (no GPU is touched). Its own process: its own Ray cluster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import os, signal
os.environ["CUDA_VISIBLE_DEVICES"] = "4,5,6,7"  # a node whose visible GPUs are 4..7; 2 ranks hold 4 and 5
import ray
from megatron_apo.rollout.fleet import init_ray, shutdown_ray
from megatron_apo.rollout.placement import engine_gpus

def stop(signum, frame):
    pass

signal.signal(signal.SIGTERM, stop)
assert init_ray(num_cpus=2, gpus=engine_gpus(2, os.environ["CUDA_VISIBLE_DEVICES"], 8))
assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"  # the trainer's own view is restored
assert signal.getsignal(signal.SIGTERM) is stop  # and so is its stop handler

@ray.remote(num_gpus=1, num_cpus=0)
class Engine:
    def visible(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES")

engines = [Engine.remote() for _ in range(2)]
print("GPUS", ray.cluster_resources().get("GPU"), sorted(ray.get([e.visible.remote() for e in engines])))
shutdown_ray()
'''


@pytest.mark.slow
def test_local_ray_engines_get_the_gpus_no_rank_uses(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GPUS 2.0 ['6', '7']" in out.stdout, out.stdout
