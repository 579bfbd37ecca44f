"""A transformers causal LM as a rollout engine: runs the whole RL loop, weight sync included, without a GPU.

Batched sampling with a KV cache (left padding, explicit position ids), one torch.Generator per
(prompt, sample) seeded from (seed, request id, sample index), so a fixed seed reproduces the same
samples however requests are batched or spread over engines. Weights arrive as Hugging Face-named
full tensors, either directly (`update_weights`) or streamed over the sync group (`receive_weights`).
"""

from __future__ import annotations

import inspect
import random
import re
from typing import Iterable, Sequence

import torch

from megatron_apo.models.routing import capture_hf_routing, last_position_experts, prompt_position_experts
from megatron_apo.rollout.engine import RolloutEngine, Sample, SamplingParams
from megatron_apo.rollout.sampling import request_seed, sample_tokens
from megatron_apo.rollout.sync_group import measure_broadcast_bandwidth
from megatron_apo.rollout.weight_sync import (
    EngineSyncState,
    SyncEndpoint,
    WeightStore,
    open_sync_group,
    receive_weights,
)


def build_hf_model(hf_config: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An HF causal LM with random weights from a config.json dict (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("hf_config: missing 'model_type' (e.g. 'qwen2' or 'llama')")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def hf_tensor_slots(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, tuple | None]]:
    """HF checkpoint name -> (parameter, index into it, or None for the whole parameter).

    transformers 5 keeps a MoE layer's experts fused (Qwen3-MoE: `mlp.experts.gate_up_proj` [E, 2F, H], expert
    e's rows being [gate; up], and `mlp.experts.down_proj` [E, H, F]) while checkpoints and weight sync name them
    per expert (`mlp.experts.<e>.gate_proj.weight`, `up_proj`, `down_proj`): those names index the fused
    parameter. transformers 4's per-expert modules are plain parameters under the checkpoint names already.
    """
    slots: dict[str, tuple[torch.nn.Parameter, tuple | None]] = {}
    for name, p in model.named_parameters():
        m = _FUSED_EXPERTS.match(name)
        if not m or p.dim() != 3:
            slots[name] = (p, None)
            continue
        prefix, kind = m.groups()
        for e in range(p.shape[0]):
            if kind == "down_proj":
                slots[f"{prefix}.{e}.down_proj.weight"] = (p, (e,))
            else:
                f = p.shape[1] // 2
                slots[f"{prefix}.{e}.gate_proj.weight"] = (p, (e, slice(0, f)))
                slots[f"{prefix}.{e}.up_proj.weight"] = (p, (e, slice(f, 2 * f)))
    return slots


def _slot_view(slot: tuple[torch.nn.Parameter, tuple | None]) -> torch.Tensor:
    param, index = slot
    return param if index is None else param.data[index]


class CPUEngine(RolloutEngine):
    def __init__(
        self,
        hf_config: dict | None = None,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
        version: int = -1,
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 64,
        num_threads: int | None = 1,
        model_path: str | None = None,
    ):
        """Weights: `named_tensors`, or `model_path` (an HF folder read here, version 0 unless given), or
        random until the first update or sync."""
        if num_threads:
            torch.set_num_threads(num_threads)
        if model_path is not None:
            from megatron_apo.models.safetensors_io import HFCheckpoint

            if hf_config is not None or named_tensors is not None:
                raise ValueError("CPUEngine: give model_path alone, or hf_config (+ named_tensors)")
            ckpt = HFCheckpoint(model_path)
            hf_config, named_tensors = ckpt.config, ((n, ckpt.get(n)) for n in ckpt.tensors)
            version = max(version, 0)
        if hf_config is None:
            raise ValueError("CPUEngine: give hf_config or model_path")
        self.hf_config = dict(hf_config)
        self.model = build_hf_model(hf_config, dtype)
        self.max_batch_size = max_batch_size
        self._sync = EngineSyncState()
        self._store = WeightStore()  # received buckets become the weights (no copy per sync)
        self._moe_top_k = int(getattr(self.model.config, "num_experts_per_tok", 0) or 0)  # 0: dense
        self._slots = hf_tensor_slots(self.model)  # by HF checkpoint name (experts: views of fused parameters)
        self._tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        # transformers 5.x renamed past_key_values -> cache (the old name is deprecated); support both lines
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if named_tensors is not None:
            self.update_weights(version, named_tensors)

    # ---- weights ----------------------------------------------------------------------------------------

    def weights_version(self) -> int:
        return self._sync.version

    def load_hf_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], adopt: bool = False) -> list[str]:
        """Copies HF-named full tensors into the model; returns the names loaded.

        `adopt`: the tensors' memory belongs to this engine (its `WeightStore`), so a parameter of the same
        dtype is pointed at it instead of copied into (a tied head shares the embedding's Parameter).
        """
        named_tensors = list(named_tensors)
        self._check_tensors(named_tensors)  # everything first: a bad entry must not leave a half-loaded model
        loaded = []
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name == "lm_head.weight" and self._tied:
                    continue  # the tied head is the embedding, loaded under its own name
                param, index = self._slots[name]
                if index is None and adopt and tensor.dtype == param.dtype and tensor.device == param.device:
                    param.data = tensor
                else:  # (an expert's slot of a fused parameter is always copied into)
                    _slot_view((param, index)).copy_(tensor.to(param.dtype))
                loaded.append(name)
        return loaded

    def _check_tensors(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named_tensors:
            if name == "lm_head.weight" and self._tied:
                continue
            slot = self._slots.get(name)
            if slot is None:
                raise KeyError(f"CPUEngine: unknown HF parameter {name!r} "
                               f"(model has e.g. {next(iter(self._slots))!r})")
            param = _slot_view(slot)
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"CPUEngine: {name}: shape {tuple(tensor.shape)} "
                                 f"does not match the model's {tuple(param.shape)}")

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """All or nothing: an incomplete set of tensors is refused before any is loaded."""
        named_tensors = list(named_tensors)
        self._check_tensors(named_tensors)
        self._sync.check_complete({n for n, _ in named_tensors}, self._expected_names())
        self.load_hf_tensors(named_tensors)
        self._sync.mark_loaded(version)

    def export_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The served weights by HF name (diagnostics); refused while the engine refuses to serve."""
        self._sync.check_serving()
        return [(n, _slot_view(slot).detach().clone()) for n, slot in self._slots.items()]

    def _expected_names(self) -> set[str]:
        return {n for n in self._slots if not (self._tied and n == "lm_head.weight")}

    def join_sync_group(self, endpoint: SyncEndpoint, rank: int) -> None:
        """Blocks until every member (trainer sender + all engines) has joined."""
        if self._sync.group is not None:
            self._sync.group.close()
        self._sync.group = open_sync_group(endpoint, rank)

    def receive_weights(self, version: int) -> dict:
        """Receives one sync over the group; the weights change only if every bucket and the whole sync verify.

        All-new or all-old: verified buckets are staged in the `WeightStore` (buffers the served weights do
        not use) and adopted together at the end, so a rejected sync leaves the served weights untouched
        (the engine still refuses to serve until a later sync verifies).
        """
        staged: list[tuple[str, torch.Tensor]] = []

        def stage(tensors):  # a bucket with a wrong name or shape fails here: reported, and the sync still drains
            self._check_tensors(tensors)
            staged.extend(tensors)

        result = receive_weights(self._sync.group, stage, expected_version=version, ring=self._store)
        if result.ok and self._sync.check_complete(set(result.loaded), self._expected_names(), raise_error=False):
            self.load_hf_tensors(staged, adopt=True)
            self._store.commit()
        self._sync.apply(result, self._expected_names())
        return result.as_dict()

    def sync_group_bandwidth(self, nbytes: int) -> float:
        """Joins a plain broadcast of `nbytes` on the sync group (link diagnostics; the benchmark's baseline)."""
        return measure_broadcast_bandwidth(self._sync.group, nbytes)

    # ---- inference --------------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """fp32 logits [B, S, V] of equal-length sequences (a probe forward for parity checks)."""
        self._sync.check_serving()
        ids = torch.tensor([list(t) for t in token_ids], dtype=torch.long)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return self.model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()

    @torch.no_grad()
    def generate(
        self,
        prompt_token_ids: list[list[int]],
        params: SamplingParams,
        request_ids: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """`request_ids` (default 0..P-1) seed the per-sample generators; the fleet passes global prompt indices."""
        self._sync.check_serving()
        if request_ids is None:
            request_ids = range(len(prompt_token_ids))
        if len(request_ids) != len(prompt_token_ids):
            raise ValueError("generate: request_ids must have one entry per prompt")
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate: every prompt needs at least one token")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        rows = [(p, s) for p in range(len(prompt_token_ids)) for s in range(params.n)]
        out: list[list[Sample | None]] = [[None] * params.n for _ in prompt_token_ids]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            prompts = [prompt_token_ids[p] for p, _ in chunk]
            gens = [torch.Generator().manual_seed(request_seed(seed, request_ids[p], s)) for p, s in chunk]
            for (p, s), sample in zip(chunk, self._generate_rows(prompts, params, gens)):
                sample.prompt_index, sample.sample_index = p, s
                sample.meta["weights_version"] = self._sync.version
                out[p][s] = sample
        return out  # type: ignore[return-value]

    def _cache_of(self, out):
        return out["cache"] if self._cache_kw == "cache" else out.past_key_values

    def _generate_rows(self, prompts: list[list[int]], params: SamplingParams,
                       gens: list[torch.Generator]) -> list[Sample]:
        b = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits in the last column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        with capture_hf_routing(self.model, self._moe_top_k) as router_calls:
            return self._decode(ids, mask, pos, params, gens, router_calls)

    def _decode(self, ids, mask, pos, params: SamplingParams, gens: list[torch.Generator],
                router_calls: list) -> list[Sample]:
        b = ids.shape[0]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, next_logits = self._cache_of(out), out.logits[:, -1].float()
        # MoE: the experts of every prompt position before the last (rollout.routing_replay replays them), then of
        # the position whose logits sample the next token, per layer (docs/models.md)
        prompt_routed = prompt_position_experts(router_calls, mask.sum(-1).tolist())
        experts, routed = last_position_experts(router_calls, b), [[] for _ in range(b)]
        last_pos = pos[:, -1]
        stop = set(params.stop_token_ids)
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        finish = ["length"] * b
        done = [False] * b
        for step in range(params.max_new_tokens):
            tok, lp = sample_tokens(next_logits, params, gens)
            for i in range(b):
                if done[i]:
                    continue
                tokens[i].append(int(tok[i]))
                logps[i].append(float(lp[i]))
                if experts is not None:
                    routed[i].append(experts[i].tolist())
                if int(tok[i]) in stop:
                    done[i], finish[i] = True, "stop"
            if all(done) or step + 1 == params.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=last_pos.unsqueeze(-1),
                             use_cache=True, **{self._cache_kw: past})
            past, next_logits = self._cache_of(out), out.logits[:, -1].float()
            experts = last_position_experts(router_calls, b)
        meta = [{"logprob_space": params.logprob_space()} for _ in range(b)]
        for i in range(b):
            if routed[i]:
                meta[i]["routed_experts"] = routed[i]  # [T][layers][k]
                meta[i]["prompt_routed_experts"] = prompt_routed[i]  # [P - 1][layers][k]
        return [Sample(-1, -1, tokens[i], logps[i], finish[i], meta[i]) for i in range(b)]
