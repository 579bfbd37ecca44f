"""`megatron-apo demo`: the headline comparison of the collapse study (version 2), end to end on a 2-core CPU, no
downloads.

It is the study (this package) cut to one task instance: task B, the support squeeze
(`megatron_apo/data/squeeze_task.py`), with GRPO and APO (default form) on 4 seeds, exactly as the study's first
instance runs them (`configs/study_v2.yaml`: same task, reference SFT and RL settings):
1. the task's parquet files and a word tokenizer;
2. SFT of a tiny Qwen2-shaped Megatron model on the task's demonstrations -> the reference;
3. RL from that reference with GRPO and with APO (Megatron trainer, Ray CPU rollout fleet, weight sync); the runs
   attach to the one local Ray cluster the study starts;
4. exact pass@k (teacher forcing of every valid answer, eval/exact.py) of reference / GRPO / APO: trained pass@1,
   trained-hard and held-out-hard pass@16 with 95% paired-bootstrap intervals over prompts and seeds, and APO's
   difference to GRPO; a table, one sentence that follows the numbers, results.json, pass_at_k.png, dynamics.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_apo.study.config import ReferenceSection, StudyConfig, TaskSection

DIFF_LABEL = "apo - grpo"


@dataclass
class DemoConfig:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    instance: int = 0
    tp: int = 1
    num_categories: int = 192
    sft_steps: int = 2000
    rl_steps: int = 60
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    rl_lr: float = 1e-3
    k: int = 16  # the endpoint: pass@k on the hard prompts
    methods: dict = field(default_factory=lambda: {
        "grpo": ["algorithm.loss_mode=vanilla"],
        "apo": ["algorithm.loss_mode=apo_ratio"],
    })

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(seeds=[1], num_categories=16, sft_steps=30, rl_steps=2, prompts_per_step=4, samples_per_prompt=4,
                   k=4)

    @property
    def columns(self) -> list[tuple[str, int]]:
        """(split, k) of each column: the guard (trained pass@1) and the study's two hard endpoints."""
        return [("trained", 1), ("trained_hard", self.k), ("heldout_hard", self.k)]

    def study(self, out: Path) -> StudyConfig:
        rl = [
            "data.max_prompt_length=16", "data.max_response_length=6", f"data.train_batch_size={self.prompts_per_step}",
            f"rollout.n={self.samples_per_prompt}", "rollout.num_engines=1", "rollout.temperature=1.0",
            f"trainer.total_steps={self.rl_steps}", "trainer.ppo_epochs=2", f"trainer.lr={self.rl_lr}",
            "trainer.micro_batch_size=128", "algorithm.kl_loss_coef=0.05", "algorithm.anchor_metrics=true",
        ]
        task = TaskSection(kind="toy_squeeze", num_categories=self.num_categories, hard_fraction=0.5,
                           instances=[self.instance])
        return StudyConfig(out_dir=str(out), tp=self.tp, task=task,
                           reference=ReferenceSection(sft_steps=self.sft_steps), rl=rl, seeds=list(self.seeds),
                           methods=dict(self.methods), eval_mode="exact", eval_n=self.k, endpoint_k=self.k,
                           bootstrap=2000, primary=["apo"])


def run_demo(cfg: DemoConfig, out: str | Path) -> dict:
    from megatron_apo.study.runner import run_study

    out = Path(out)
    t0 = time.time()
    print(f"demo: reference (SFT, {cfg.sft_steps} steps), then GRPO and APO for {cfg.rl_steps} RL steps each on "
          f"{len(cfg.seeds)} seed(s), on the support-squeeze task ({cfg.num_categories} categories); outputs in {out}",
          flush=True)
    results = run_study(cfg.study(out), out)
    table = demo_table(results, cfg)
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    print(format_demo_table(table, cfg))
    print(headline(table, cfg, len(results["seeds"])))
    print(f"demo: done in {(time.time() - t0) / 60:.1f} min; wrote {out}/results.json, {out}/pass_at_k.png, "
          f"{out}/dynamics.png and {out}/report.md", flush=True)
    return table


def demo_table(results: dict, cfg: DemoConfig) -> dict:
    """{label: {split: {"pass@k": [est, lo, hi]}}} for the reference, each method and APO's paired difference to
    GRPO (95% paired-bootstrap intervals over prompts and seeds)."""

    def cell(e: dict, est: str, k: int) -> list[float]:
        return [e[est][k - 1], e["ci_low"][k - 1], e["ci_high"][k - 1]]

    splits = results["splits"]
    table = {label: {s: {f"pass@{k}": cell(splits[s]["methods"][label], "pass_at_k", k)} for s, k in cfg.columns}
             for label in results["labels"]}
    if "apo" in results["labels"]:
        table[DIFF_LABEL] = {s: {f"pass@{k}": cell(splits[s]["methods"]["apo"]["diff_vs_grpo"], "est", k)}
                             for s, k in cfg.columns}
    return table


def format_demo_table(table: dict, cfg: DemoConfig) -> str:
    names = {"trained": "trained", "trained_hard": "trained hard", "heldout_hard": "held-out hard"}
    lines = ["| run | " + " | ".join(f"{names[s]} pass@{k}" for s, k in cfg.columns) + " |",
             "|---" * (len(cfg.columns) + 1) + "|"]
    for label, row in table.items():
        cells = [row[s][f"pass@{k}"] for s, k in cfg.columns]
        fmt = "{:+.3f} [{:+.3f}, {:+.3f}]" if label == DIFF_LABEL else "{:.3f} [{:.3f}, {:.3f}]"
        lines.append(f"| {label} | " + " | ".join(fmt.format(*c) for c in cells) + " |")
    return "\n".join(lines)


def headline(table: dict, cfg: DemoConfig, seeds: int) -> str:
    """One sentence that follows the numbers, whichever way they went."""
    ref, grpo = table["reference"], table.get("grpo")
    if grpo is None:
        return ""
    k = cfg.k
    p1 = lambda r: r["trained"]["pass@1"][0]  # noqa: E731
    pk = lambda r: r["heldout_hard"][f"pass@{k}"][0]  # noqa: E731

    def change(what: str, a: float, b: float) -> str:
        if abs(b - a) <= 0.005:
            return f"keeps {what} at {a:.3f}"
        return f"{'raises' if b > a else 'lowers'} {what} {a:.3f} -> {b:.3f}"

    s = (f"GRPO {change('trained pass@1', p1(ref), p1(grpo))} and "
         f"{change(f'held-out hard pass@{k}', pk(ref), pk(grpo))}")
    if DIFF_LABEL in table:
        d, lo, hi = table[DIFF_LABEL]["heldout_hard"][f"pass@{k}"]
        if lo > 0:
            verdict = "APO keeps more of it than GRPO"
        elif hi < 0:
            verdict = "APO keeps less of it than GRPO"
        else:
            verdict = "no difference between APO and GRPO is detected (the interval includes 0)"
        s += f"; APO - GRPO there is {d:+.3f} [{lo:+.3f}, {hi:+.3f}], so {verdict}"
    return s + f"; {seeds} seed(s) of one task instance (the pre-registered 12-replicate study: docs/science.md)."
