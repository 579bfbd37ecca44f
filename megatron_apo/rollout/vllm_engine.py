"""vLLM as a rollout engine (GPU): one `vllm.LLM` per Ray actor, tensor parallel inside the engine.

Pinned to vLLM 0.11.0 (the `gpu` extra) and written against that version's RLHF examples
(`examples/offline_inference/rlhf.py` + `rlhf_utils.py`): the engine actor is scheduled into a Ray
placement group with one GPU bundle per TP rank (`placement_group_capture_child_tasks` so vLLM's Ray
executor puts its workers there), a `worker_extension_cls` adds our methods to every vLLM worker, and
`collective_rpc` runs them on all TP workers at once. The data plane is vLLM's
`StatelessProcessGroup` + `PyNcclCommunicator` (our `NcclSyncGroup`), with the same bucket/checksum
protocol as the gloo path (`weight_sync.py`); each TP worker receives the full HF tensors and
`model.load_weights` keeps its own shard. vLLM's newer built-in weight-transfer engine (2026,
`WeightTransferConfig`) has a different wire format and no checksum; we do not use it.

After every weight update the prefix cache is reset, otherwise cached KV blocks computed with the old
weights would silently serve old-policy tokens. Log-probs use `logprobs_mode="processed_logprobs"`:
the distribution actually sampled from (temperature, top-k/top-p applied), like the CPU engine.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Sequence

import torch

from megatron_apo.rollout.engine import RolloutEngine, Sample, SamplingParams
from megatron_apo.rollout.sampling import request_seed
from megatron_apo.rollout.weight_sync import EngineSyncState, SyncEndpoint, WeightSyncError

WORKER_EXTENSION = "megatron_apo.rollout.vllm_worker.SyncWorkerExtension"


class VLLMEngine(RolloutEngine):
    """Construct inside a Ray actor (see `vllm_engine_spec`). `model_path`: an HF folder; or `hf_config` for dummy weights."""

    def __init__(
        self,
        model_path: str | None = None,
        hf_config: dict | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        version: int = -1,
        **llm_kwargs,
    ):
        from vllm import LLM

        if (model_path is None) == (hf_config is None):
            raise ValueError("VLLMEngine: give exactly one of model_path (HF folder) or hf_config (dummy weights)")
        if hf_config is not None:  # vLLM needs a folder with config.json even for dummy weights
            model_path = tempfile.mkdtemp(prefix="vllm_cfg_")
            with open(os.path.join(model_path, "config.json"), "w") as f:
                json.dump(hf_config, f)
            llm_kwargs.setdefault("load_format", "dummy")
        if tensor_parallel_size > 1:
            # the actor itself holds no GPU; vLLM's Ray executor places one worker per bundle of our placement group
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        self.llm = LLM(
            model=model_path,
            skip_tokenizer_init=True,  # token ids in, token ids out
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="ray" if tensor_parallel_size > 1 else None,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self.tensor_parallel_size = tensor_parallel_size
        self._sync = EngineSyncState(version=version)

    # ---- weights ----------------------------------------------------------------------------------------

    def weights_version(self) -> int:
        return self._sync.version

    def sync_state(self) -> dict:
        return self._sync.as_dict()

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Through Ray (no NCCL group): every TP worker loads the full tensors, keeping its shard."""
        named = [(n, t.detach().cpu()) for n, t in named_tensors]
        self.llm.collective_rpc("load_hf_tensors", args=(named,))
        self.llm.reset_prefix_cache()
        self._sync.mark_loaded(version)

    def join_sync_group(self, endpoint: SyncEndpoint, rank_offset: int) -> None:
        """Every TP worker joins as rank_offset + its vLLM rank (the fleet reserves TP ranks per engine)."""
        self.llm.collective_rpc("join_sync_group", args=(endpoint, rank_offset))
        self._sync.group = endpoint

    def receive_weights(self, version: int) -> dict:
        results = self.llm.collective_rpc("receive_weights", args=(version,))
        self.llm.reset_prefix_cache()  # stale prefix/KV blocks would serve the old policy
        bad = [r for r in results if not r["ok"]]
        if bad:
            self._sync.serving, self._sync.failure = False, "; ".join(e for r in bad for e in r["errors"])
            raise WeightSyncError(f"weight sync v{version} rejected: {self._sync.failure}")
        if len({r["checksum"] for r in results}) != 1:
            self._sync.serving, self._sync.failure = False, "TP workers received different syncs"
            raise WeightSyncError(self._sync.failure)
        self._sync.mark_loaded(results[0]["version"], results[0]["checksum"])
        return {k: v for k, v in results[0].items() if k != "loaded"}

    def sync_group_bandwidth(self, nbytes: int) -> float:
        return min(self.llm.collective_rpc("sync_group_bandwidth", args=(nbytes,)))

    def export_weights(self):
        raise NotImplementedError("VLLMEngine holds TP-sharded, fused weights; a restarted vLLM engine waits for the next sync")

    # ---- inference --------------------------------------------------------------------------------------

    def _vllm_params(self, params: SamplingParams, seed: int | None, **extra):
        from vllm import SamplingParams as VSP

        return VSP(n=params.n, temperature=params.temperature, top_p=params.top_p,
                   top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                   stop_token_ids=list(params.stop_token_ids), ignore_eos=True, seed=seed, logprobs=0,
                   detokenize=False, **extra)

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 request_ids: Sequence[int] | None = None) -> list[list[Sample]]:
        from vllm.inputs import TokensPrompt

        self._sync.check_serving()
        if request_ids is None:
            request_ids = range(len(prompt_token_ids))
        sps = [self._vllm_params(params, None if params.seed is None else request_seed(params.seed, r, 0) % (1 << 31))
               for r in request_ids]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids], sps, use_tqdm=False)
        result = []
        for p, out in enumerate(outs):
            samples = []
            for s, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                toks = list(comp.token_ids)
                lps = [float(step[t].logprob) for t, step in zip(toks, comp.logprobs)]
                samples.append(Sample(p, s, toks, lps, "stop" if comp.finish_reason == "stop" else "length",
                                      {"logprob_space": params.logprob_space()}))
            result.append(samples)
        return result

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (a probe for parity checks; temperature 1)."""
        from vllm.inputs import TokensPrompt

        self._sync.check_serving()
        sp = self._vllm_params(SamplingParams(max_new_tokens=1), seed=0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(t)) for t in token_ids], sp, use_tqdm=False)
        return [[float(step[t].logprob) for t, step in zip(seq[1:], out.prompt_logprobs[1:])]
                for seq, out in zip(token_ids, outs)]


def vllm_engine_spec(tensor_parallel_size: int = 1, **engine_kwargs):
    """An EngineSpec for the fleet: one placement group of `tensor_parallel_size` GPU bundles per engine."""
    from megatron_apo.rollout.fleet import EngineSpec

    return EngineSpec(
        VLLMEngine,
        dict(tensor_parallel_size=tensor_parallel_size, **engine_kwargs),
        num_cpus=0,
        num_gpus=1 if tensor_parallel_size == 1 else 0,
        sync_ranks_per_engine=tensor_parallel_size,
        placement_bundles=[{"GPU": 1, "CPU": 1}] * tensor_parallel_size if tensor_parallel_size > 1 else None,
        restore_from_peer=False,
    )
