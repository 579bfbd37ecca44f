"""The controller (trainer global rank 0): prompts -> fleet rollouts -> rewards -> advantages -> RLBatch.

It owns everything that is not SPMD: the dataset and its resumable sampler, the tokenizer, the reward
pool, the Ray rollout fleet and the weight-sync group's sending end, and the answer memory.

Every file of `data.train_files` (and `val_files`) is read, in order. Rewards are scored in
`data.reward_workers` processes; a sample whose reward fails (raises, returns a non-number or NaN/inf, kills
its process) is counted (`reward/errors`, `reward/nonfinite`) and left out of training, and a step where
more than `data.reward_max_error_frac` of the samples fail stops the run with one line.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_apo.algorithms.advantages import AnswerMemory, compute_advantages, normalize_answer
from megatron_apo.config import RunConfig
from megatron_apo.data.dataset import PromptDataset, PromptSampler
from megatron_apo.data.tokenizer import load_tokenizer
from megatron_apo.models.config import ModelConfig
from megatron_apo.rewards.pool import RewardBatch, RewardItem, RewardPool, TooManyRewardErrors
from megatron_apo.rollout.engine import SamplingParams
from megatron_apo.trainer.batch import RLBatch, build_batch

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    batch: RLBatch
    metrics: dict


class Controller:
    def __init__(self, cfg: RunConfig, model_cfg: ModelConfig):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.dataset = PromptDataset.from_parquet(cfg.data.train_files, self.tokenizer,
                                                  cfg.data.max_prompt_length, on_invalid=cfg.data.on_invalid)
        self.sampler = PromptSampler(len(self.dataset), seed=cfg.seed, shuffle=cfg.data.shuffle,
                                     sources=self.dataset.sources)
        self.rewards = RewardPool(num_workers=cfg.data.resolved_reward_workers(), timeout_s=5.0,
                                  reward_fn=cfg.data.reward_fn, on_error="zero",
                                  max_error_frac=cfg.data.reward_max_error_frac)
        self._reward_warned = False
        self.memory = AnswerMemory.from_config(cfg.algorithm) if cfg.algorithm.adv_calibration_memory else None
        self.fleet = self._start_fleet()
        self._sync_group = None
        self._sync_endpoint = None
        self._val = None
        self._pending_idx = None

    # ---- fleet ------------------------------------------------------------------------------------------

    def _start_fleet(self):
        from megatron_apo.models.hf_mapping import hf_config_from_model_config
        from megatron_apo.rollout.engines import make_engine_spec
        from megatron_apo.rollout.fleet import RolloutFleet
        from megatron_apo.rollout.placement import engine_gpus, ranks_on_node
        from megatron_apo.trainer.lifecycle import signals_blocked

        r = self.cfg.rollout
        spec = make_engine_spec(r.engine, hf_config=hf_config_from_model_config(self.model_cfg), engine_tp=r.engine_tp,
                                gpu_memory_utilization=r.gpu_memory_utilization, seed=self.cfg.seed,
                                routing_replay=r.routing_replay)
        gpus = None
        if not r.ray_address and torch.cuda.is_available():
            # this node's trainer ranks hold its first GPUs: a local Ray cluster gets only the others (docs/gpu.md)
            gpus = engine_gpus(ranks_on_node(), os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
        # Ray's processes (GCS, raylet, engine workers) inherit SIGUSR1 blocked: Slurm's time-limit signal reaches
        # every process of the step, and without a handler they would die of it while the trainer checkpoints.
        with signals_blocked((signal.SIGUSR1,)):
            return RolloutFleet(spec, r.num_engines, ray_address=r.ray_address, ray_gpus=gpus)

    def sync_group(self):
        """The trainer's end of the sync group; reopened whenever the fleet opened a new one (engine restart)."""
        from megatron_apo.rollout.sync_group import open_sync_group, rendezvous_host

        # NCCL only where both ends are GPUs (vLLM engines); CPU engines join over gloo even from a GPU trainer
        nccl = self.cfg.rollout.engine == "vllm" and torch.cuda.is_available()
        ep = self.fleet.sync_endpoint(backend="nccl" if nccl else "gloo",
                                      host=rendezvous_host(self.cfg.rollout.sync_host),
                                      timeout_s=self.cfg.rollout.sync_timeout_s, fresh=self._sync_group is None)
        if ep is not self._sync_endpoint:
            if self._sync_group is not None:
                self._sync_group.close()
            self._sync_group, self._sync_endpoint = open_sync_group(ep, 0), ep
        return self._sync_group

    def shutdown(self) -> None:
        self.fleet.shutdown()
        self.rewards.close()

    # ---- one step's data --------------------------------------------------------------------------------

    def sampling_params(self, step: int, n: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=n or r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=self.cfg.data.max_response_length,
                              stop_token_ids=tuple(self.tokenizer.stop_token_ids), seed=self.cfg.seed * 100003 + step)

    def rollout(self, step: int) -> Rollout:
        t0 = time.perf_counter()
        # after FleetNeedsSync the same prompts again: the fleet resumes that request instead of starting over
        idx = self._pending_idx
        if idx is None:
            idx = self.sampler.next_indices(self.cfg.data.train_batch_size)
        self._pending_idx = idx
        items = [self.dataset[i] for i in idx]
        prompts = [it.prompt_ids for it in items]
        samples = self.fleet.generate(prompts, self.sampling_params(step))
        self._pending_idx = None
        t_gen = time.perf_counter() - t0
        flat = [(p, s) for p, group in enumerate(samples) for s in group]
        texts = [self.tokenizer.decode(_strip_stop(s.token_ids, self.tokenizer.stop_token_ids)) for _, s in flat]
        reward_items = [RewardItem(items[p].row.data_source, texts[i], items[p].row.ground_truth,
                                   items[p].row.extra_info)
                        for i, (p, _) in enumerate(flat)]
        scored = self.score(reward_items)
        rewards = torch.tensor(scored.scores, dtype=torch.float32)
        adv = advantages_of(scored, [idx[p] for p, _ in flat], texts, self.cfg.algorithm, self.memory)
        batch = build_batch(prompts, samples, rewards, adv)
        lengths = batch.response_mask.sum(1)
        correct = {(p, normalize_answer(_answer(scored, texts, i))) for i, (p, _) in enumerate(flat) if rewards[i] > 0}
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/pass_rate": (rewards > 0).float().mean().item(),
            "reward/distinct_correct": len(correct) / len(prompts),  # distinct correct answers per prompt
            "reward/timeouts": float(scored.num_timeouts),
            "reward/errors": float(scored.num_errors),
            "reward/nonfinite": float(scored.num_nonfinite),
            "time/reward_s": scored.seconds,
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/truncated_frac": sum(s.finish_reason == "length" for _, s in flat) / len(flat),
            "time/rollout_generate_s": t_gen,
            "time/rollout_total_s": time.perf_counter() - t0,
            "fleet/weights_version": float(self.fleet.weights_version()),
        }
        return Rollout(batch, metrics)

    def _reward_failure(self, e: TooManyRewardErrors) -> TooManyRewardErrors:
        return TooManyRewardErrors(f"{self._reward_name()}: {e} (data.reward_max_error_frac="
                                   f"{self.cfg.data.reward_max_error_frac:g}); fix the reward function",
                                   e.num_errors, e.num_items, e.first_error)

    def _reward_name(self) -> str:
        return (f"data.reward_fn={self.cfg.data.reward_fn}" if self.cfg.data.reward_fn else
                "the data_source reward registry (data.reward_fn unset)")

    def score(self, items: Sequence[RewardItem]) -> RewardBatch:
        """Rewards of one batch; failures are counted, the first one of the run is logged with its message."""
        name = self._reward_name()
        try:
            scored = self.rewards.score(items)
        except TooManyRewardErrors as e:
            raise self._reward_failure(e) from None
        if scored.num_errors and not self._reward_warned:
            self._reward_warned = True  # once per run; reward/errors and reward/nonfinite count every step
            first = next(e for e in scored.errors if e is not None)
            logger.warning("%s: %d of %d samples failed to score and are left out of training (first: %s); "
                           "reward/errors and reward/nonfinite count them every step", name, scored.num_errors,
                           len(items), first)
        return scored

    def evaluate(self, step: int, label: str) -> dict | None:
        """pass@k of the weights the fleet serves now, on data.val_files; writes <out_dir>/eval/step_XXXXXXX.json."""
        from pathlib import Path

        from megatron_apo.eval.report import write_results
        from megatron_apo.eval.runner import EvalConfig, evaluate

        if not self.cfg.data.val_files or self.cfg.trainer.eval_n <= 0:
            return None
        if self._val is None:
            self._val = PromptDataset.from_parquet(self.cfg.data.val_files, self.tokenizer,
                                                   self.cfg.data.max_prompt_length, on_invalid=self.cfg.data.on_invalid)
        prompts = [self._val[i] for i in range(min(len(self._val), self.cfg.trainer.eval_max_prompts))]
        r = self.cfg.rollout
        ecfg = EvalConfig(n=self.cfg.trainer.eval_n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=self.cfg.data.max_response_length, seed=self.cfg.seed,
                          prompts_per_call=max(1, 256 // self.cfg.trainer.eval_n))
        try:
            res = evaluate(self.fleet, self.tokenizer, prompts, ecfg, reward_pool=self.rewards, label=label,
                           meta={"step": step, "loss_mode": self.cfg.algorithm.loss_mode}, progress=False)
        except TooManyRewardErrors as e:
            raise self._reward_failure(e) from None
        write_results(res, Path(self.cfg.out_dir) / "eval" / f"step_{step:07d}.json")
        return res

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "memory": self.memory.state_dict() if self.memory else None}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.memory is not None and state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"])


def _answer(scored: RewardBatch, texts: Sequence[str], i: int) -> str:
    """The final answer the reward read from sample i (the whole text when it named none)."""
    return scored.answers[i] if scored.answers and scored.answers[i] is not None else texts[i]


def advantages_of(scored: RewardBatch, prompt_ids: Sequence, texts: Sequence[str], algorithm,
                  memory: AnswerMemory | None) -> torch.Tensor:
    """Per-sample advantages; the answer memory compares the reward's extracted final answers, not whole texts.

    A sample whose reward failed (`scored.errors`) is no training signal: advantage 0, and left out of its
    group's mean and std and of the memory.
    """
    n = len(scored.scores)
    keep = [i for i in range(n) if scored.errors[i] is None]
    adv = torch.zeros(n, dtype=torch.float32)
    if keep:
        rewards = torch.tensor([scored.scores[i] for i in keep], dtype=torch.float32)
        adv[keep] = compute_advantages(rewards, torch.tensor([prompt_ids[i] for i in keep]), algorithm,
                                       calibrator=memory, answers=[_answer(scored, texts, i) for i in keep],
                                       texts=[texts[i] for i in keep])
    return adv


def _strip_stop(ids: list[int], stop: tuple[int, ...]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stop else ids
