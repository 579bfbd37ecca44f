"""Typed run configuration: dataclasses, YAML files and dotted `key=value` overrides (OmegaConf).

Loss keys use the official APO repository's names (loss_mode=apo_ratio, apo_push_coeff, ...), so an
APO/verl config's `actor` section can be pasted into `algorithm:`. Errors name the file and key.

Choice fields are str-valued Enums (`Choice`): OmegaConf rejects a bad value at merge, naming the key and the valid
values, and `cfg.algorithm.loss_agg_mode == "token-mean"` still holds. Two choices stay registry-checked strings,
because a registry, not this file, owns their values: `algorithm.loss_mode` (the loss registry,
`algorithms/registry.py`) and `rollout.engine` (`rollout.engine.ENGINES`). Range checks live with each section
(`validate()`), run by `load_config` and again by the trainer's `validate_run_config`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_apo.dtypes import DTYPE_NAMES


class UserError(Exception):
    """A mistake the user can fix (a config, an input file, a flag): the CLI prints its message as one line.

    Any other exception is a bug or an environment failure and keeps its traceback.
    """


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line that names the key and the fix."""


class InputError(UserError, ValueError):
    """A bad input other than the run config (a file's content, a command-line flag); one line naming it."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist; one line naming the key or flag and the path."""


class Choice(str, enum.Enum):
    """A config choice: compares equal to, prints and serialises as its value (e.g. "token-mean")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


def _choice(name: str, values) -> type[Choice]:
    # member name = value, so OmegaConf (which looks members up by name) accepts YAML's spelling, hyphens included
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


LossAggMode = _choice("LossAggMode", ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm"))
ApoRectification = _choice("ApoRectification", ("paper", "split"))
ApoAnchorRatio = _choice("ApoAnchorRatio", ("old", "ref"))
ApoPullForm = _choice("ApoPullForm", ("ratio_clip", "ratio", "log"))
ApoPullWeight = _choice("ApoPullWeight", ("abs_adv", "indicator"))
KlLossType = _choice("KlLossType", ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"))  # aliases: losses/common.py
AdvStdScope = _choice("AdvStdScope", ("group", "batch"))
AdvCalibration = _choice("AdvCalibration", ("none", "inverse_success"))
AdvSignFilter = _choice("AdvSignFilter", ("all", "positive", "negative"))
DType = _choice("DType", tuple(DTYPE_NAMES))  # the one dtype table (megatron_apo/dtypes.py), aliases included
TransformerImpl = _choice("TransformerImpl", ("transformer_engine", "local"))
OnInvalid = _choice("OnInvalid", ("error", "skip"))
LrDecayStyle = _choice("LrDecayStyle", ("constant", "linear", "cosine"))
Recompute = _choice("Recompute", ("none", "full"))
RolloutCorrection = _choice("RolloutCorrection", ("none", "tis_token", "tis_seq", "mask_token", "mask_seq"))


class _Section:
    """`validate()`: the choice fields hold one of their values (also when set in code, past OmegaConf), then the
    section's range checks (`_check`). ConfigError names `<section>.<key>`."""

    _section: typing.ClassVar[str] = ""

    def validate(self) -> None:
        for name, hint in typing.get_type_hints(type(self)).items():
            choice = _choice_type(hint)
            value = getattr(self, name, None)
            if choice is None or (value is None and hint is not choice):
                continue
            if value not in choice._value2member_map_:
                unset = " (or leave it unset)" if hint is not choice else ""
                raise ConfigError(f"{self._section}.{name}={value!r} is unknown; use one of "
                                  f"{', '.join(choice._value2member_map_)}{unset}")
        self._check()

    def _check(self) -> None:
        pass

    def _at_least(self, key: str, lo: float, why: str = "") -> None:
        v = getattr(self, key)
        if v < lo:
            raise ConfigError(f"{self._section}.{key} must be >= {lo}{why}, got {v}")


def _choice_type(hint) -> type[Choice] | None:
    for t in (hint, *typing.get_args(hint)):  # Optional[X] is Union[X, None]
        if isinstance(t, type) and issubclass(t, Choice):
            return t
    return None


@dataclass
class AlgorithmConfig(_Section):
    """Loss and advantage settings (docs/algorithms.md); defaults are the APO paper's. Names follow the official APO
    repository's README, so an APO/verl `actor` section pastes in. The dataclass validates itself (`validate()`:
    choices, then the ranges in `_check`); `algorithm.loss_mode` is checked against the loss registry
    (`algorithms/registry.py`) once `loss_modules` are imported, by `trainer/validation.py::validate_run_config`."""

    _section: typing.ClassVar[str] = "algorithm"

    loss_mode: str = "apo_ratio"
    """A registered loss: vanilla | apo_ratio | casp | any name registered by a module of `loss_modules`."""

    loss_modules: list[str] = field(default_factory=list)
    """Python modules imported on the CLI and on every rank before the config is checked, so that their
    `@register_policy_loss` losses can be named by `loss_mode` (e.g. [my_pkg.my_loss])."""

    loss_agg_mode: LossAggMode = LossAggMode["token-mean"]
    """How per-token terms are reduced over the response mask (verl's modes)."""

    clip_ratio_low: float = 0.2
    """PPO clip: r is clipped below at 1 - clip_ratio_low; in [0, 1)."""

    clip_ratio_high: float = 0.2
    """PPO clip: r is clipped above at 1 + clip_ratio_high; >= 0."""

    clip_ratio_c: float = 3.0
    """Dual clip for A < 0: the token loss is at most -A * clip_ratio_c; > 1."""

    entropy_coeff: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss); 0 = off."""

    apo_push_coeff: float = 1.05
    """APO lambda: weight of the sampled token's ratio on A < 0 tokens; >= 0."""

    apo_pull_coeff: float = 0.1
    """APO beta: weight of the anchor (safe-manifold) pull on A < 0 tokens; >= 0."""

    apo_topk: int = 8
    """APO: size K of the safe manifold, the reference's Top-K at each position."""

    apo_exclude_sampled: bool = True
    """APO: remove the sampled token from the safe manifold."""

    apo_rectification: ApoRectification = ApoRectification.paper
    """APO form: paper (r~ = push*r - pull*r_anchor in the dual clip) | split (push*PG + pull*Pull)."""

    apo_pull_form: ApoPullForm = ApoPullForm.ratio_clip
    """APO split form only: ratio_clip | ratio | log (the pull term of M / M_old)."""

    apo_pull_weight: ApoPullWeight = ApoPullWeight.abs_adv
    """APO split form only: the pull's weight, |A| (abs_adv) or 1 (indicator)."""

    apo_anchor_ratio: ApoAnchorRatio = ApoAnchorRatio.old
    """APO paper form: the virtual anchor's ratio. old: sum_S (pi_ref/Z_ref) * pi/pi_old, the reference-weighted mean
    of the anchors' own ratios (1 at pi = pi_old: every update starts inside the trust region) | ref: M / Z_ref (the
    earlier transcription; drifts with the policy)."""

    apo_all_wrong_pull: float = 0.0
    """APO gamma: weight of the pull alone on the tokens of groups where every response is wrong (reward <= 0; GRPO
    gives them A = 0); 0 = off, >= 0."""

    apo_min_anchor_mass: float = 0.0
    """APO tau: positions whose reference mass on the safe manifold, Z_ref, is below it get no pull (near-deterministic
    positions whose anchors are junk); in [0, 1), 0 = off."""

    use_kl_loss: bool = False
    """Add kl_loss_coef * KL(pi, pi_ref) on every response token."""

    use_kl_loss_on_wrong: bool = False
    """Add the KL term on A < 0 tokens only (the conditional-KL baseline)."""

    kl_loss_coef: float = 0.001
    """Weight of the KL term; >= 0."""

    kl_loss_type: KlLossType = KlLossType.low_var_kl
    """KL estimator: kl (k1) | abs | mse (k2) | low_var_kl (k3)."""

    casp_topn: int = 3
    """CaSP: N, the policy's Top-N candidates per position."""

    casp_alpha: float = 0.01
    """CaSP: share of a correct forking token's ratio spread over the Top-N; in [0, 1]."""

    casp_top1_gamma: float = 0.1
    """CaSP: extra push on a wrong token that is the policy's argmax (A' = A * (1 + gamma)); >= 0."""

    casp_entropy_quantile: float = 0.8
    """CaSP: high-entropy ("forking") tokens lie above this quantile of their response's entropy; in [0, 1]."""

    norm_adv_by_std: bool = True
    """GRPO: divide the centred rewards by their standard deviation."""

    adv_std_scope: AdvStdScope = AdvStdScope.group
    """group (GRPO) | batch (centre per group, divide by the batch's standard deviation)."""

    adv_calibration: AdvCalibration = AdvCalibration.none
    """none | inverse_success (hard prompts' advantages weigh more)."""

    adv_sign_filter: AdvSignFilter = AdvSignFilter.all
    """all | positive | negative: keep only the A > 0 (or A < 0) responses' advantages, the others get 0 (the
    study's positive-only / negative-only GRPO controls)."""

    calib_alpha: float = 1.0
    """inverse_success: exponent of (1 - success rate); >= 0."""

    adv_calibration_memory: bool = False
    """Scale a correct response's advantage down by how frequent its answer mode already is (AnswerMemory)."""

    calib_memory_gamma: float = 0.5
    """AnswerMemory: scale is 1 - gamma * frequency; in [0, 1]."""

    calib_memory_ngram: int = 3
    """AnswerMemory: word n-grams of the reasoning in a memory signature."""

    calib_memory_similarity: float = 0.5
    """AnswerMemory: Jaccard of n-gram sets at or above which two answers are one mode; in [0, 1]."""

    calib_memory_max_per_prompt: int = 64
    """AnswerMemory: newest correct answers kept per prompt."""

    anchor_metrics: bool = False
    """Log the reference Top-K (anchor) metrics for every loss mode (the reference pass computes one Top-K more)."""

    position_metrics: int = 0
    """Log the gradient-off (clip) fractions of the first N response positions (`pos/grad_off_frac_<i>`,
    `pos/neg_grad_off_frac_<i>`); 0 = off."""

    logprob_chunk_size: int = 4096
    """Tokens per chunk in the vocab-parallel ops (bounds peak memory)."""

    rollout_correction: RolloutCorrection = RolloutCorrection.none
    """Rollout-vs-trainer mismatch correction (docs/training.md), a per-token weight on the loss from the ratio
    pi_old / pi_rollout: none | tis_token (min(ratio, cap)) | tis_seq (the sequence's ratio, truncated at cap) |
    mask_token / mask_seq (0 for tokens / sequences whose ratio is outside [lower, upper]). On-policy and
    one-step-off alike; with none and rollout.one_step_off_policy, rollout.tis_cap selects tis_token."""

    rollout_correction_cap: float = 2.0
    """tis_token / tis_seq: the truncation of the importance ratio; >= 1."""

    rollout_correction_lower: float = 0.5
    """mask_token / mask_seq: the smallest ratio kept; in [0, 1]."""

    rollout_correction_upper: float = 2.0
    """mask_token / mask_seq: the largest ratio kept; >= 1."""

    def _check(self) -> None:
        if not isinstance(self.loss_mode, str) or not self.loss_mode:
            self._bad("loss_mode", "must be the name of a registered loss")
        if not all(isinstance(m, str) and m for m in self.loss_modules):
            self._bad("loss_modules", "must be a list of module names")
        for key, lo, hi in (("clip_ratio_low", 0.0, 1.0), ("clip_ratio_high", 0.0, None), ("entropy_coeff", None, None),
                            ("apo_push_coeff", 0.0, None), ("apo_pull_coeff", 0.0, None), ("kl_loss_coef", 0.0, None),
                            ("apo_all_wrong_pull", 0.0, None),
                            ("casp_alpha", 0.0, 1.0), ("casp_top1_gamma", 0.0, None),
                            ("casp_entropy_quantile", 0.0, 1.0), ("calib_alpha", 0.0, None),
                            ("calib_memory_gamma", 0.0, 1.0), ("calib_memory_similarity", 0.0, 1.0)):
            self._number(key, lo, hi, hi_open=key == "clip_ratio_low")
        self._number("clip_ratio_c", 1.0, None, lo_open=True)
        self._number("apo_min_anchor_mass", 0.0, 1.0, hi_open=True)
        self._number("rollout_correction_cap", 1.0, None)
        self._number("rollout_correction_lower", 0.0, 1.0)
        self._number("rollout_correction_upper", 1.0, None)
        for key in ("apo_topk", "casp_topn", "calib_memory_ngram", "calib_memory_max_per_prompt", "logprob_chunk_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                self._bad(key, "must be a positive integer")
        if isinstance(self.position_metrics, bool) or not isinstance(self.position_metrics, int) \
                or self.position_metrics < 0:
            self._bad("position_metrics", "must be an integer >= 0 (0 = off)")
        for key in ("apo_exclude_sampled", "use_kl_loss", "use_kl_loss_on_wrong", "anchor_metrics", "norm_adv_by_std",
                    "adv_calibration_memory"):
            if not isinstance(getattr(self, key), bool):
                self._bad(key, "must be true or false")

    def _bad(self, key: str, why: str) -> None:
        raise ConfigError(f"algorithm.{key}={getattr(self, key)!r}: {why}")

    def _number(self, key: str, lo: float | None, hi: float | None, lo_open: bool = False,
                hi_open: bool = False) -> None:
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self._bad(key, "must be a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            self._bad(key, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            self._bad(key, f"must be {'<' if hi_open else '<='} {hi}")


@dataclass
class ModelSection(_Section):
    """The policy (and reference) model: architecture, dtype, kernels (docs/models.md)."""

    _section: typing.ClassVar[str] = "model"

    config: str = "tiny"
    """The architecture: a name from model_configs/ (model_configs/<name>.yaml) or a path to such a YAML file."""

    params_dtype: DType = DType.float32
    """dtype of the weights: float32 | bfloat16 | float16 (fp32, bf16, fp16, half and float are accepted too)."""

    transformer_impl: Optional[TransformerImpl] = None
    """transformer_engine (fused TE layers, GPU) | local (megatron-core's own layers); None: TE with CUDA, local
    without."""

    fusions: bool = True
    """megatron-core's fused kernels with CUDA (bias-activation, bias-dropout, RoPE, gradient accumulation where its
    kernel exists; docs/gpu.md "Fused kernels"); false turns them all off. Always off without CUDA."""

    moe_aux_loss_coeff: float = 0.0
    """MoE models: weight of the router's load-balancing loss (docs/models.md); 0 turns it off. Logged as
    train/moe_aux_loss when > 0; the reference model never carries it."""

    def _check(self) -> None:
        self._at_least("moe_aux_loss_coeff", 0, " (0 turns it off)")


@dataclass
class ParallelConfig:
    """How the trainer's ranks are split (docs/architecture.md). One class for the run config and
    `megatron_apo.parallel.init_distributed`."""

    tensor_model_parallel_size: int = 1
    """TP: each layer's weights are split over this many ranks; the world size must be a multiple of TP x PP."""

    pipeline_model_parallel_size: int = 1
    """PP: the layers are split into this many consecutive stages, one per rank of a pipeline."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline: model chunks per pipeline stage (needs PP > 1); None: one chunk per stage."""

    expert_model_parallel_size: int = 1
    """MoE models: the experts are split over this many ranks (docs/models.md)."""

    nccl_timeout_minutes: int = 30
    """Timeout in minutes of the default process group (NCCL on GPU) and Megatron's groups."""

    control_timeout_minutes: int = 360
    """Timeout in minutes of the gloo control plane, where the ranks wait while rank 0 rolls out."""

    def validate(self, world_size: int) -> None:
        """The one TP x PP (x EP) divisibility check and the timeout ranges; ConfigError names the keys and the fix."""
        tp, pp, ep = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                      self.expert_model_parallel_size)
        for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                           ("expert_model_parallel_size", ep)):
            if value < 1:
                raise ConfigError(f"parallel.{key}={value} must be >= 1")
        for key in ("nccl_timeout_minutes", "control_timeout_minutes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be >= 1 (minutes), got {getattr(self, key)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or pp == 1):
            raise ConfigError(f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                              "pipeline_model_parallel_size > 1 and a value >= 1; remove it or raise PP")
        if world_size % (tp * pp):
            raise ConfigError(f"parallel: world size {world_size} is not divisible by TP*PP = {tp * pp}; "
                              f"launch a multiple of {tp * pp} processes or change the parallel sizes")
        # Megatron-Core's expert grid: world = PP x expert-TP (= TP) x EP x expert-DP.
        if (world_size // pp) % (tp * ep):
            raise ConfigError(f"parallel: world size {world_size} / PP {pp} is not divisible by TP*EP = {tp * ep}; "
                              "change parallel.expert_model_parallel_size or the number of processes")


@dataclass
class DataSection(_Section):
    """Prompts, their tokenizer and the reward (docs/data.md)."""

    _section: typing.ClassVar[str] = "data"

    train_files: list[str] = field(default_factory=list)
    """Training prompts: parquet files in verl's schema."""

    val_files: list[str] = field(default_factory=list)
    """Evaluation prompts (verl-schema parquet), used by the pass@k eval when trainer.eval_n > 0."""

    tokenizer: Optional[str] = None
    """An HF tokenizer folder, or a sentencepiece .model file."""

    max_prompt_length: int = 512
    """Prompts longer than this many tokens are dropped (and counted in the data report)."""

    max_response_length: int = 1024
    """Tokens a rollout generates at most per sample."""

    train_batch_size: int = 8
    """Prompts per RL step; each is sampled rollout.n times."""

    shuffle: bool = True
    """Visit the prompts in a seeded random order each epoch; false: in file order."""

    on_invalid: OnInvalid = OnInvalid.skip
    """A malformed data row: skip (dropped and counted) | error (stop, naming the file and row)."""

    reward_fn: Optional[str] = None
    """A custom reward, "path/to/file.py:fn" with verl's compute_score signature; None: the built-in math reward."""

    reward_workers: Optional[int] = None
    """Processes scoring rewards in parallel (each sample keeps its time limit). None: half the controller node's
    cores, at least 1; 0: in the controller's own process (no isolation: a reward that exits ends the run)."""

    reward_max_error_frac: float = 0.5
    """A step stops (one line naming data.reward_fn) when more than this share of its samples fail to score (the
    reward raised, returned a non-number or NaN/inf, or killed its process); failed samples never train."""

    def _check(self) -> None:
        self._at_least("train_batch_size", 1)
        if self.reward_workers is not None:
            self._at_least("reward_workers", 0, " (0 scores in the controller's process; leave unset for the default)")
        if not 0.0 <= self.reward_max_error_frac <= 1.0:
            raise ConfigError(f"data.reward_max_error_frac must be in [0, 1], got {self.reward_max_error_frac}")

    def resolved_reward_workers(self) -> int:
        """`reward_workers`, or half the cores this process may run on (a Slurm step's share), at least 1."""
        import os

        if self.reward_workers is not None:
            return self.reward_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        return max(1, cores // 2)


@dataclass
class RolloutSection(_Section):
    """The rollout fleet: engines, sampling and weight sync (docs/rollout.md)."""

    _section: typing.ClassVar[str] = "rollout"

    engine: str = "cpu"
    """cpu (transformers) | vllm: a name of the engine registry rollout.engine.ENGINES (checked by preflight)."""

    num_engines: int = 1
    """Engine replicas in the fleet (Ray actors); each serves a share of the step's prompts."""

    engine_tp: int = 1
    """Tensor parallel size inside each vLLM engine (GPUs per engine)."""

    n: int = 8
    """Samples per prompt (the GRPO group)."""

    temperature: float = 1.0
    """Sampling temperature of rollouts (and of the pass@k eval)."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all."""

    top_k: int = -1
    """Sample among the top_k most likely tokens only; -1 keeps all."""

    ray_address: Optional[str] = None
    """Address of a running Ray cluster to join; None: start a local Ray."""

    sync_bucket_mb: Optional[int] = None
    """Weight-sync bucket size in MiB; None: 512 with CUDA (NCCL), 64 on CPU."""

    sync_host: Optional[str] = None
    """The address engines reach trainer rank 0 at for the weight sync; None: Ray's node IP of rank 0."""

    sync_dtype: Optional[DType] = None
    """dtype weights are sent in; None: the engine's (vllm bfloat16, cpu float32)."""

    sync_timeout_s: float = 300.0
    """Seconds any side of a weight sync waits for the others (joining, a header, a bucket) before a named error."""

    one_step_off_policy: bool = False
    """Generate step n+1's rollouts while step n trains (weights one version old), corrected by truncated importance
    sampling: each token's loss is weighted by min(pi_old / pi_rollout, tis_cap) -- the
    algorithm.rollout_correction=tis_token case, chosen when rollout_correction is none (an alias for it)."""

    tis_cap: float = 2.0
    """With one_step_off_policy: the cap of the per-token importance weight pi_old / pi_rollout; >= 1."""

    gpu_memory_utilization: float = 0.6
    """vLLM engines: the share of each GPU's memory the engine may take (weights and KV cache), in (0, 1]."""

    routing_replay: bool = False
    """MoE (R3): the engine returns the experts it routed every token to and the trainer's routers replay them in
    the old-policy and training passes (gate weights and aux loss still from the router); docs/models.md."""

    def _check(self) -> None:
        self._at_least("n", 1)
        self._at_least("sync_timeout_s", 1.0)
        if self.sync_bucket_mb is not None:
            self._at_least("sync_bucket_mb", 1)
        if self.one_step_off_policy:
            self._at_least("tis_cap", 1.0, " (it truncates pi_old / pi_rollout)")


@dataclass
class OptimConfig:
    """Megatron-Core's Adam (DistributedOptimizer when DP > 1): `trainer/optim.py::build_optimizer` reads these.
    The run config's `trainer:` section is one (TrainerSection extends it)."""

    lr: float = 1e-6
    """Peak learning rate (after trainer.lr_warmup_steps)."""

    min_lr: float = 0.0
    """The learning rate a linear or cosine trainer.lr_decay_style decays to at the last step."""

    weight_decay: float = 0.0
    """Adam's decoupled weight decay (AdamW); 0 turns it off."""

    adam_beta1: float = 0.9
    """Adam's decay rate of the first-moment (gradient) average."""

    adam_beta2: float = 0.999
    """Adam's decay rate of the second-moment (squared gradient) average."""

    adam_eps: float = 1e-8
    """Adam's epsilon, added to the denominator for numerical stability."""

    clip_grad: float = 1.0
    """Gradients are clipped to this global L2 norm before each optimizer step; 0 turns clipping off."""

    use_distributed_optimizer: bool = True
    """Shard the optimizer state over the data-parallel ranks (Megatron's DistributedOptimizer, when DP > 1)."""


@dataclass
class TrainerSection(OptimConfig, _Section):
    """The RL loop's settings, and the optimizer's (OptimConfig: lr, min_lr, weight_decay, adam_*, clip_grad)."""

    _section: typing.ClassVar[str] = "trainer"

    total_steps: int = 10
    """RL steps to train (each: roll out, score, train, sync the weights)."""

    ppo_epochs: int = 1
    """Passes over each step's samples; each pass takes one optimizer step per mini-batch."""

    ppo_mini_batch_size: int = 0
    """Samples per optimizer step; 0: the whole step batch (one optimizer step per epoch)."""

    micro_batch_size: int = 4
    """Samples per forward/backward micro-batch (gradients accumulate over a mini-batch's micro-batches)."""

    micro_batch_tokens: int = 0
    """> 0: micro-batches hold at most this many tokens (samples x their own longest sequence, or the sum of the
    lengths when packed), balanced over the DP ranks, instead of micro_batch_size samples padded to the step's
    longest sequence; 0: by count (docs/training.md, "Micro-batches by tokens and packing")."""

    pack_sequences: bool = False
    """Several samples share one row of micro_batch_tokens (no padding; positions restart per sample and attention
    stays within it: THD with Transformer Engine, a block-diagonal causal mask with the local spec)."""

    lr_warmup_steps: int = 0
    """Steps over which the learning rate rises linearly to lr; 0: no warmup."""

    lr_decay_style: LrDecayStyle = LrDecayStyle.constant
    """After warmup: constant | linear | cosine decay from lr to min_lr at total_steps."""

    ref_cpu_offload: bool = False
    """Keep the reference model's weights in host memory except during its forward (GPU memory for transfers)."""

    recompute: Recompute = Recompute.none
    """none | full: keep only each layer's input and recompute the layer in backward (Megatron's full uniform
    recompute, one layer at a time): activation memory for compute; see `megatron-apo plan --recompute full`."""

    eval_n: int = 0
    """> 0: a pass@k eval with this many samples per prompt on data.val_files, at the start and the end; 0: none."""

    eval_max_prompts: int = 64
    """The eval uses the first this-many prompts of data.val_files."""

    tensorboard: bool = True
    """Also write the metrics to TensorBoard (<out_dir>/tensorboard, when tensorboard is installed)."""

    wandb_project: Optional[str] = None
    """Also log the metrics to this Weights & Biases project (needs wandb installed); None: no W&B."""

    progress: bool = True
    """Show a progress bar (rich) on rank 0."""

    def _check(self) -> None:
        for key in ("total_steps", "ppo_epochs", "micro_batch_size"):
            self._at_least(key, 1)
        self._at_least("micro_batch_tokens", 0)
        if self.pack_sequences and not self.micro_batch_tokens:
            raise ConfigError("trainer.pack_sequences: true needs trainer.micro_batch_tokens > 0 (the tokens one "
                              "packed row holds, e.g. 16384)")
        for key in ("lr", "min_lr"):  # the optimizer would fail deep inside the ranks, or train on NaN
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"trainer.{key} must be a finite number >= 0, got {v}")


@dataclass
class CheckpointSection(_Section):
    """Saving, loading and resuming (docs/training.md, docs/reliability.md)."""

    _section: typing.ClassVar[str] = "checkpoint"

    dir: Optional[str] = None
    """The folder checkpoints are saved in and resumed from; None: <out_dir>/checkpoints."""

    save_interval: int = 20
    """Steps between checkpoints (docs/reliability.md); 0: only after the last step and on SIGTERM/SIGUSR1."""

    keep_last: int = 2
    """The newest this-many checkpoints are kept, older ones removed after each save; 0 keeps them all."""

    load: Optional[str] = None
    """Initial weights (policy and reference) from a Megatron checkpoint; None: the model's initialisation."""

    resume: bool = True
    """Continue from the latest checkpoint in `dir` when there is one."""

    allow_unverified: bool = False
    """Load a checkpoint that has no checksums.json (its files cannot be verified before they are read; a Megatron
    checkpoint runs code when loaded): only for one from a trusted source (docs/reliability.md, "Security")."""

    allow_config_change: bool = False
    """Resume although the algorithm/optimizer settings, rollout.n or data.train_batch_size changed (each change is
    named)."""

    reset_optimizer: bool = False
    """Resume at another TP/PP size from a checkpoint whose optimizer state cannot be resharded, with fresh Adam
    state."""

    def _check(self) -> None:
        self._at_least("save_interval", 0, " (0 saves only at the end and on a stop signal)")
        self._at_least("keep_last", 0, " (0 keeps every checkpoint)")


@dataclass
class RunConfig:
    """A run's whole config: one YAML file, one section per dataclass (`load_config`)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The model: `model:` (ModelSection)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the trainer's ranks are split: `parallel:` (ParallelConfig, checked against the world size)."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The loss and advantages: `algorithm:` (AlgorithmConfig)."""

    data: DataSection = field(default_factory=DataSection)
    """Prompts, tokenizer and reward: `data:` (DataSection)."""

    rollout: RolloutSection = field(default_factory=RolloutSection)
    """The rollout fleet: `rollout:` (RolloutSection)."""

    trainer: TrainerSection = field(default_factory=TrainerSection)
    """The RL loop and optimizer: `trainer:` (TrainerSection)."""

    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Saving, loading and resuming: `checkpoint:` (CheckpointSection)."""

    seed: int = 1234
    """Seed of the model's initialisation, the prompt order and the rollouts' sampling."""

    out_dir: str = "runs/default"
    """The run's folder: metrics.jsonl, evals, TensorBoard logs and (by default) the checkpoints."""

    def validate(self) -> None:
        """Every section's choices and ranges (no files, no world size: see trainer/validation.py)."""
        for section in (self.model, self.algorithm, self.data, self.rollout, self.trainer, self.checkpoint):
            section.validate()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Schema defaults <- YAML file <- dotted overrides; returns a `RunConfig`.

    Raises ConfigError with a one-line message for a missing file, an unknown key or a bad value.
    """
    base = OmegaConf.structured(RunConfig)
    layers = [base]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # noqa: BLE001 - YAML parse errors
            raise ConfigError(f"{p}: not valid YAML ({_first_line(e)})") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, trainer:, ...), "
                              f"not a {type(loaded).__name__.replace('Config', '').lower()}")
        layers.append(loaded)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value (e.g. algorithm.apo_topk=16)")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or _first_line(e)
        raise ConfigError(f"{path or 'overrides'}: unknown config key {key!r}{_known_hint(RunConfig, key)}") from None
    except ValidationError as e:
        raise ConfigError(f"{path or 'overrides'}: bad value for {getattr(e, 'full_key', '?')!r}: "
                          f"{_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path or 'overrides'}: {_first_line(e)}") from None
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    return cfg


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _known_hint(schema: type, key: str) -> str:
    """Lists the valid keys of the section the unknown key was looked up in."""
    parts = str(key).split(".")
    cls = schema
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        f = fields.get(part)
        if f is None or not dataclasses.is_dataclass(
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            return ""
        cls = type(f.default_factory())
    if not dataclasses.is_dataclass(cls):
        return ""
    return f"; valid keys here: {', '.join(f.name for f in dataclasses.fields(cls))}"
