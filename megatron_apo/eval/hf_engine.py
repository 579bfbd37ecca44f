"""A minimal in-process RolloutEngine over a Hugging Face causal LM, for `megatron-apo eval` on CPU.

Written for evaluation while the Ray CPU engine is not on main; once it is, the eval CLI should use that.
Prompts are grouped by length so no padding is ever needed (no position-id subtleties with left padding);
log-probs are taken from the processed scores, i.e. the distribution actually sampled from (temperature,
top-k/top-p applied), as `rollout/engine.py` specifies.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch

from megatron_apo.rollout.engine import RolloutEngine, Sample, SamplingParams


class HFEngine(RolloutEngine):
    def __init__(self, model, max_batch_sequences: int = 64):
        self.model = model.eval()
        self.max_batch_sequences = max_batch_sequences
        self._version = -1

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, **kw) -> "HFEngine":
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        return cls(model, **kw)

    def weights_version(self) -> int:
        return self._version

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise ValueError(f"HFEngine.update_weights: unknown parameter {name!r}")
                if tuple(params[name].shape) != tuple(tensor.shape):
                    raise ValueError(f"HFEngine.update_weights: {name} has shape {tuple(params[name].shape)}, "
                                     f"got {tuple(tensor.shape)}")
                params[name].copy_(tensor)
        self._version = version

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        from transformers import GenerationConfig

        if params.seed is not None:
            torch.manual_seed(params.seed)
        stop = set(params.stop_token_ids)
        pad = params.stop_token_ids[0] if params.stop_token_ids else 0
        gen_cfg = GenerationConfig(
            do_sample=True, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,  # 0 disables HF's default top_k=50
            max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
            eos_token_id=list(params.stop_token_ids) or None, pad_token_id=pad,
            output_scores=True, return_dict_in_generate=True,
        )
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(prompt_token_ids):
            if not ids:
                raise ValueError(f"HFEngine.generate: prompt {i} is empty")
            by_length[len(ids)].append(i)
        results: list[list[Sample]] = [[] for _ in prompt_token_ids]
        per_call = max(1, self.max_batch_sequences // params.n)
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), per_call):
                chunk = indices[start : start + per_call]
                inputs = torch.tensor([prompt_token_ids[i] for i in chunk], dtype=torch.long)
                out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                          generation_config=gen_cfg)
                new_tokens = out.sequences[:, length:]
                logps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
                token_logps = logps.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
                for row in range(new_tokens.shape[0]):
                    p_idx, s_idx = chunk[row // params.n], row % params.n
                    toks = new_tokens[row].tolist()
                    end, reason = len(toks), "length"
                    for j, t in enumerate(toks):
                        if t in stop:
                            end, reason = j + 1, "stop"
                            break
                    results[p_idx].append(Sample(p_idx, s_idx, toks[:end], token_logps[row, :end].tolist(), reason))
        return results
