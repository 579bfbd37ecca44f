"""Methods added to every vLLM worker (`worker_extension_cls`), called through `LLM.collective_rpc`.

Kept in its own module so vLLM workers import only this (and the protocol), not the engine or Ray fleet.
`self.device` and `self.model_runner` come from the vLLM worker this class is mixed into.
"""

from __future__ import annotations

import torch

from megatron_apo.rollout.sync_group import open_sync_group
from megatron_apo.rollout.weight_sync import BufferRing, receive_weights


class SyncWorkerExtension:
    def join_sync_group(self, endpoint, rank_offset: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        self._weight_sync_group = open_sync_group(endpoint, rank_offset + get_world_group().rank, device=self.device)

    def receive_weights(self, version: int) -> dict:
        model = self.model_runner.model
        if not hasattr(self, "_weight_sync_ring"):
            self._weight_sync_ring = BufferRing()  # receive buffers reused across syncs
        result = receive_weights(getattr(self, "_weight_sync_group", None),
                                 lambda tensors: model.load_weights(weights=tensors), expected_version=version,
                                 ring=self._weight_sync_ring)
        torch.cuda.synchronize()
        return result.as_dict()

    def load_hf_tensors(self, named) -> int:
        model = self.model_runner.model
        model.load_weights(weights=[(n, t.to(self.device)) for n, t in named])
        return len(named)

    def sync_group_bandwidth(self, nbytes: int) -> float:
        from megatron_apo.rollout.sync_group import measure_broadcast_bandwidth

        return measure_broadcast_bandwidth(self._weight_sync_group, nbytes)
