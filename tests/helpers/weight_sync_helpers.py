"""Pieces of the weight-sync safety tests that Ray actors and spawned trainer ranks import."""

from __future__ import annotations

import os

from megatron_apo.rollout.cpu_engine import CPUEngine


class FailingLoadCPUEngine(CPUEngine):
    """The CPU engine whose load of a received bucket raises once fleet-wide (the first engine to try claims
    `fail_marker`); every other load, and every load of a replacement engine, works."""

    def __init__(self, *args, fail_marker: str, **kwargs):
        self.fail_marker, self._receiving = fail_marker, False
        super().__init__(*args, **kwargs)

    def receive_weights(self, version: int) -> dict:
        self._receiving = True
        try:
            return super().receive_weights(version)
        finally:
            self._receiving = False

    def _check_tensors(self, named_tensors):
        if self._receiving:
            try:
                fd = os.open(self.fail_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super()._check_tensors(named_tensors)
            os.close(fd)
            raise RuntimeError("planted load failure")
        return super()._check_tensors(named_tensors)


def te_labelled_plan_body(tp: int, ep: int, model: str) -> dict:
    """A trainer rank (TP x EP, gloo) whose parameters carry the TP labels Transformer Engine 2.11 gives them,
    then the weight-sync plan over them: {hf_name: (shape, [(dim, start, length) of each piece])}.

    TE labels a Linear's weight partition_dim 1 if it is row-parallel, else 0; megatron-core builds an expert
    linear with parallel_mode=None (neither) whenever EP > 1 or expert-TP > 1, so TE labels the row-parallel
    expert fc2 dim 0 (transformer_engine/pytorch/module/linear.py, megatron/core/extensions/transformer_engine.py).
    """
    from megatron.core import parallel_state as ps

    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.models.sharding import is_expert_param, unwrap
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.rollout.weight_sync.plan import build_plan

    init_distributed(ParallelConfig(tp, 1, expert_model_parallel_size=ep), seed=3)
    cfg = load_model_config(model)
    chunk = build_gpt_model(cfg)
    parallel_mode_none = ep > 1 or ps.get_expert_tensor_parallel_world_size() > 1
    for name, p in unwrap(chunk).named_parameters():
        if is_expert_param(name) and parallel_mode_none and name.endswith(".weight"):
            p.tensor_model_parallel, p.partition_dim = True, 0  # TE: "not row-parallel" -> dim 0
    plan, _ = build_plan([chunk], cfg, None, 64 << 10)
    out = {}
    for bucket in plan:
        for hf_name, _, shape, _, _ in bucket.entries:
            out[hf_name] = (tuple(shape), [])
        for piece in bucket.pieces:
            out[piece.hf_name][1].append((piece.dim, piece.start, piece.length))
    return out


def rendezvous_listen_body() -> list[str]:
    """A spawned rank: the addresses this process listens on at MASTER_PORT (rank 0 hosts the training store)."""
    import os

    import psutil

    from megatron_apo.parallel import init_distributed

    init_distributed(backend="gloo")
    port = int(os.environ["MASTER_PORT"])
    return [c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
