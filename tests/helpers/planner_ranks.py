"""Rank body for the planner test: the parameters one rank of a real Megatron GPTModel holds."""

from __future__ import annotations


def local_param_count(tp: int, pp: int, model: str = "tiny", ep: int = 1) -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    expert_model_parallel_size=ep))
    gpt = build_gpt_model(load_model_config(model))
    n = sum(p.numel() for p in gpt.parameters())
    return ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), n
