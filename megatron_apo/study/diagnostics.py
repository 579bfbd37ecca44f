"""The mechanism precondition of the version-2 criterion (docs/science.md), measured on a run's final policy.

At a wrong response's **branch state** (the prompt and the response's longest prefix that some valid answer shares,
i.e. the state before its first wrong token): is a valid continuation inside the reference's Top-K there, and how
much of the policy's mass lies outside that Top-K? Wrong responses are sampled from the policy (the CPU engine on
the exported checkpoint) for the hard prompts; both distributions are the sampling ones (logits / temperature).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

import torch

from megatron_apo.rollout.engine import SamplingParams
from megatron_apo.rollout.sampling import processed_logprobs


def branch_state(response: Sequence[int], valid: Sequence[Sequence[int]]) -> tuple[int, set[int]] | None:
    """(length of the longest valid prefix, the valid next tokens there) for a wrong response; None if it is
    valid (it equals a valid sequence, stop token included)."""
    response = list(response)
    if any(response == list(v) for v in valid):
        return None
    j = 0
    while j < len(response) and any(len(v) > j and list(v[:j + 1]) == response[:j + 1] for v in valid):
        j += 1
    return j, {int(v[j]) for v in valid if len(v) > j and list(v[:j]) == response[:j]}


@torch.no_grad()
def precondition_stats(policy, reference, prompts: Sequence[Sequence[int]], valid: Sequence[Sequence[Sequence[int]]],
                       params: SamplingParams, k: int) -> dict:
    """Samples params.n responses per prompt from `policy`; over the wrong ones' branch states: the share with a
    valid continuation in the reference Top-k, and the median policy mass outside that Top-k."""
    samples = policy.generate([list(p) for p in prompts], params)
    states = []
    for p, ans, group in zip(prompts, valid, samples):
        for s in group:
            b = branch_state(s.token_ids, ans)
            if b is not None and b[1]:
                states.append((list(p) + list(s.token_ids[:b[0]]), b[1]))
    inside, outside = [], []
    for seq, nxt in states:
        ref_lp = processed_logprobs(reference.logits([seq])[0, -1], params)
        pol_lp = processed_logprobs(policy.logits([seq])[0, -1], params)
        top = set(torch.topk(ref_lp, k).indices.tolist())
        inside.append(bool(nxt & top))
        mask = torch.ones_like(pol_lp, dtype=torch.bool)
        mask[list(top)] = False
        outside.append(float(pol_lp[mask].exp().sum()))
    return {"num_states": len(states),
            "valid_in_ref_topk_frac": sum(inside) / len(inside) if inside else float("nan"),
            "median_mass_outside_ref_topk": statistics.median(outside) if outside else float("nan")}


def run_precondition(policy_ckpt: str, reference_ckpt: str, val_files: Sequence[str], tokenizer_path: str,
                     params: SamplingParams, k: int, scratch: Path, splits: tuple[str, ...] = ("hard",)) -> dict:
    """precondition_stats on the hard prompts (data sources ending in one of `splits`) of a run's final policy."""
    from megatron_apo.data.dataset import PromptDataset
    from megatron_apo.data.tokenizer import load_tokenizer
    from megatron_apo.eval.engines import hf_folder_for
    from megatron_apo.eval.exact import _cpu_engine, listed_answers

    tok = load_tokenizer(tokenizer_path)
    ds = PromptDataset.from_parquet(list(val_files), tok)
    prompts = [ds[i] for i in range(len(ds)) if ds[i].row.data_source.endswith(splits)]
    stop = list(tok.stop_token_ids)[:1]
    valid = [[tok.encode(a) + stop for a in listed_answers(p.row.data_source, p.row.ground_truth)] for p in prompts]
    with hf_folder_for(Path(policy_ckpt), scratch / "policy") as hp, \
            hf_folder_for(Path(reference_ckpt), scratch / "reference") as hr:
        policy, reference = _cpu_engine(hp), _cpu_engine(hr)
        return precondition_stats(policy, reference, [p.prompt_ids for p in prompts], valid, params, k)
