"""Advantages: GRPO group-relative scores, inverse-success calibration, and the answer memory hook.

docs/algorithms.md, "Advantages". Inputs are per response (one scalar reward per sampled response) plus the
index of the prompt group each response belongs to; `broadcast_to_tokens` spreads the result over the
response tokens. All functions are pure torch on small [num_responses] tensors (CPU, any rank).
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from typing import Any, Optional, Protocol, Sequence

import torch

from megatron_apo.algorithms.registry import resolve_algorithm_config
from megatron_apo.config import ConfigError

GRPO_EPS = 1e-6


def _groups(group_index) -> tuple[torch.Tensor, int]:
    """Dense group ids 0..G-1 (in order of first appearance) and G. `group_index` holds one prompt id per
    response: ints or strings (e.g. verl's uid), a list or a 1-D tensor."""
    if isinstance(group_index, torch.Tensor):
        if group_index.dim() != 1:
            raise ValueError(f"group_index must be 1-D [num_responses] (got shape {tuple(group_index.shape)})")
        keys = group_index.tolist()
    else:
        keys = list(group_index)
    dense: dict = {}
    gid = [dense.setdefault(k, len(dense)) for k in keys]
    return torch.tensor(gid, dtype=torch.long), len(dense)


def _group_sums(values: torch.Tensor, gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype).index_add_(0, gid, values)


def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor | Sequence,
    norm_adv_by_std: bool = True,
    std_scope: str = "group",
    eps: float = GRPO_EPS,
) -> torch.Tensor:
    """Group-relative advantages, one per response: (R - mean_g R) / (std + eps).

    std_scope="group": the group's unbiased std (GRPO). std_scope="batch": the unbiased std of the centred
    scores R - mean_g R over every response in a group of >= 2 (REINFORCE++-baseline style whitening).
    `norm_adv_by_std=False` drops the division (Dr. GRPO). A group of one response gets 0.
    """
    if std_scope not in ("group", "batch"):
        raise ConfigError(f"algorithm.adv_std_scope={std_scope!r}: must be one of group, batch")
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    gid, num_groups = _groups(group_index)
    if gid.numel() != r.numel():
        raise ValueError(f"group_index has {gid.numel()} entries for {r.numel()} rewards")
    if r.numel() == 0:
        return r.float()
    count = _group_sums(torch.ones_like(r), gid, num_groups)
    mean = _group_sums(r, gid, num_groups) / count
    centred = r - mean[gid]
    multi = count[gid] > 1
    centred = torch.where(multi, centred, torch.zeros_like(centred))
    if norm_adv_by_std:
        if std_scope == "group":
            var = _group_sums(centred.square(), gid, num_groups) / (count - 1).clamp(min=1)
            std = var.sqrt()[gid]
        else:
            n = int(multi.sum())
            std_b = (centred[multi].square().sum() / max(n - 1, 1)).sqrt() if n > 1 else torch.zeros((), dtype=r.dtype)
            std = std_b.expand_as(centred)
        centred = centred / (std + eps)
    return centred.float()


def group_success_rate(success: torch.Tensor, group_index) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group success rate p_g and the dense group id of each response."""
    gid, num_groups = _groups(group_index)
    s = torch.as_tensor(success).reshape(-1).to(torch.float64)
    return _group_sums(s, gid, num_groups) / _group_sums(torch.ones_like(s), gid, num_groups), gid


def inverse_success_weights(
    success: torch.Tensor, group_index, rewards: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Per-response weight w_g = (1-p_g)^alpha / mean over informative groups of (1-p_g')^alpha.

    An informative group has >= 2 responses and rewards that are not all equal (non-zero std), i.e. it
    carries advantage. The mean over those is 1, so the overall step size is unchanged; hard prompts (low
    success rate) count more. With no informative group every weight is 1.
    """
    p, gid = group_success_rate(success, group_index)
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    num_groups = p.numel()
    count = _group_sums(torch.ones_like(r), gid, num_groups)
    rmax = torch.full((num_groups,), -float("inf"), dtype=r.dtype).scatter_reduce(0, gid, r, "amax")
    rmin = torch.full((num_groups,), float("inf"), dtype=r.dtype).scatter_reduce(0, gid, r, "amin")
    informative = (count > 1) & (rmax > rmin)
    raw = (1.0 - p).clamp(min=0.0) ** alpha
    if not bool(informative.any()) or float(raw[informative].mean()) == 0.0:
        return torch.ones_like(r, dtype=torch.float32)
    return (raw / raw[informative].mean())[gid].float()


def broadcast_to_tokens(per_response: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, T]: constant over each response's tokens, 0 on padding."""
    return per_response.reshape(-1, 1).to(torch.float32) * response_mask.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# distribution-level calibration: a per-prompt memory of correct answers


class AdvantageCalibrator(Protocol):
    """The hook `compute_advantages` calls after GRPO/inverse-success; state is part of the checkpoint."""

    def calibrate(self, advantages: torch.Tensor, prompt_ids: Sequence, answers: Sequence[str],
                  texts: Sequence[str], correct: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def normalize_answer(answer: str) -> str:
    """Canonical form of a final answer for memory matching: no $, spaces, \\boxed{}, trailing period; lower."""
    a = str(answer).strip()
    m = re.fullmatch(r"\\boxed\{(.*)\}", a)
    if m:
        a = m.group(1)
    a = a.replace("$", "").rstrip(".")
    return re.sub(r"\s+", "", a).lower()


def ngram_signature(text: str, n: int) -> frozenset[int]:
    """Stable hashes (crc32, not Python's salted hash) of the word n-grams of the reasoning text."""
    words = re.findall(r"\w+|[^\w\s]", str(text).lower())
    if len(words) < n:
        return frozenset([zlib.crc32(" ".join(words).encode())]) if words else frozenset()
    return frozenset(zlib.crc32(" ".join(words[i : i + n]).encode()) for i in range(len(words) - n + 1))


def _jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class AnswerMemory:
    """Per-prompt memory of correct answers; frequent modes get their positive advantage scaled down.

    A correct response's signature is (normalised final answer, set of word n-gram hashes of its text).
    Two signatures are the same mode when the answers are equal and the n-gram sets' Jaccard similarity
    is >= `similarity`. `calibrate` scales each correct response's positive advantage by `1 - gamma * freq`,
    freq = the share of the prompt's remembered correct answers in the same mode, measured against the
    memory as it was BEFORE this batch (a fresh prompt's first correct answer has freq 0); then it records
    the batch's correct responses (keeping the newest `max_per_prompt` per prompt). So an answer the policy
    keeps producing is damped from the next step on, while a rare valid one keeps (almost) full weight.
    """

    def __init__(self, gamma: float = 0.5, ngram: int = 3, similarity: float = 0.5, max_per_prompt: int = 64):
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"algorithm.calib_memory_gamma={gamma!r}: must be in [0, 1]")
        if ngram < 1:
            raise ConfigError(f"algorithm.calib_memory_ngram={ngram!r}: must be a positive integer")
        if not 0.0 <= similarity <= 1.0:
            raise ConfigError(f"algorithm.calib_memory_similarity={similarity!r}: must be in [0, 1]")
        if max_per_prompt < 1:
            raise ConfigError(f"algorithm.calib_memory_max_per_prompt={max_per_prompt!r}: must be a positive integer")
        self.gamma, self.ngram, self.similarity, self.max_per_prompt = gamma, ngram, similarity, max_per_prompt
        self._memory: OrderedDict[str, list[tuple[str, frozenset[int]]]] = OrderedDict()

    @classmethod
    def from_config(cls, config: Any) -> "AnswerMemory":
        cfg = resolve_algorithm_config(config)
        return cls(cfg.calib_memory_gamma, cfg.calib_memory_ngram, cfg.calib_memory_similarity,
                   cfg.calib_memory_max_per_prompt)

    def _signature(self, answer: str, text: str) -> tuple[str, frozenset[int]]:
        return normalize_answer(answer), ngram_signature(text, self.ngram)

    def add(self, prompt_id, answer: str, text: str) -> None:
        entries = self._memory.setdefault(str(prompt_id), [])
        entries.append(self._signature(answer, text))
        del entries[: max(0, len(entries) - self.max_per_prompt)]

    def frequency(self, prompt_id, answer: str, text: str) -> float:
        """Share of the prompt's remembered correct answers in the same mode as (answer, text); 0 if none."""
        entries = self._memory.get(str(prompt_id), [])
        if not entries:
            return 0.0
        ans, grams = self._signature(answer, text)
        same = sum(1 for a, g in entries if a == ans and _jaccard(g, grams) >= self.similarity)
        return same / len(entries)

    def calibrate(self, advantages: torch.Tensor, prompt_ids: Sequence, answers: Sequence[str],
                  texts: Sequence[str], correct: torch.Tensor) -> torch.Tensor:
        adv = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1).clone()
        ok = torch.as_tensor(correct).reshape(-1).bool()
        if not (len(prompt_ids) == len(answers) == len(texts) == adv.numel() == ok.numel()):
            raise ValueError("AnswerMemory.calibrate: advantages, prompt_ids, answers, texts and correct "
                             "must all have one entry per response")
        # freq against the memory as it was before this batch: a fresh prompt's first correct answer has freq 0
        freq = [self.frequency(prompt_ids[i], answers[i], texts[i]) if ok[i] and adv[i] > 0 else 0.0
                for i in range(adv.numel())]
        for i in range(adv.numel()):
            if ok[i]:
                self.add(prompt_ids[i], answers[i], texts[i])
        return adv * (1.0 - self.gamma * torch.tensor(freq, dtype=adv.dtype))

    def state_dict(self) -> dict:
        """Plain lists and ints (safe for torch.save(weights_only=True) and JSON)."""
        return {
            "gamma": self.gamma, "ngram": self.ngram, "similarity": self.similarity,
            "max_per_prompt": self.max_per_prompt,
            "memory": {p: [[a, sorted(g)] for a, g in entries] for p, entries in self._memory.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.gamma, self.ngram = float(state["gamma"]), int(state["ngram"])
        self.similarity, self.max_per_prompt = float(state["similarity"]), int(state["max_per_prompt"])
        self._memory = OrderedDict(
            (p, [(a, frozenset(int(x) for x in g)) for a, g in entries]) for p, entries in state["memory"].items()
        )

    def __len__(self) -> int:
        return sum(len(v) for v in self._memory.values())


# ----------------------------------------------------------------------------------------------------------


def compute_advantages(
    rewards: torch.Tensor,
    group_index,
    config: Any,
    success: Optional[torch.Tensor] = None,
    calibrator: Optional[AdvantageCalibrator] = None,
    answers: Optional[Sequence[str]] = None,
    texts: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Per-response advantages [N] from the algorithm config: GRPO -> inverse-success -> memory hook -> sign filter.

    group_index: the prompt id of each response (ints or strings; with the memory on they must identify the
    prompt across steps, e.g. the dataset index or uid). success: which responses are correct (default
    rewards > 0). The calibrator (e.g. `AnswerMemory`) runs
    when `adv_calibration_memory` is true; it then needs `answers` (normalisable final answers, e.g. what the
    reward extracted: the last `\\boxed{}`, not the whole response) and `texts` (the responses).
    """
    cfg = resolve_algorithm_config(config)
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    ok = (rewards > 0) if success is None else torch.as_tensor(success).reshape(-1).bool()
    adv = grpo_advantages(rewards, group_index, cfg.norm_adv_by_std, cfg.adv_std_scope)
    if cfg.adv_calibration == "inverse_success":
        adv = adv * inverse_success_weights(ok, group_index, rewards, cfg.calib_alpha)
    if cfg.adv_calibration_memory:
        if calibrator is None or answers is None or texts is None:
            raise ConfigError("algorithm.adv_calibration_memory=true: compute_advantages needs calibrator= "
                              "(e.g. AnswerMemory.from_config(cfg)), answers= and texts=")
        prompt_ids = group_index.tolist() if isinstance(group_index, torch.Tensor) else list(group_index)
        adv = calibrator.calibrate(adv, prompt_ids, answers, texts, ok)
    if cfg.adv_sign_filter != "all":  # the study's controls: learn from one sign only (docs/science.md)
        keep = adv > 0 if cfg.adv_sign_filter == "positive" else adv < 0
        adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv


__all__ = [
    "AdvantageCalibrator",
    "AnswerMemory",
    "broadcast_to_tokens",
    "compute_advantages",
    "grpo_advantages",
    "group_success_rate",
    "inverse_success_weights",
    "ngram_signature",
    "normalize_answer",
]
