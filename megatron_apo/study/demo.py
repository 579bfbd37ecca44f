"""`megatron-apo demo`: GRPO's sharpening turning into collapse, and APO, end to end on a 2-core CPU, no downloads.

It is a one-seed study (this package) on the collapse task (`megatron_apo/data/collapse_task.py`):
1. the task's parquet files and a character tokenizer;
2. SFT of a tiny Qwen2-shaped Megatron model on the task's demonstrations -> the reference;
3. RL from that reference with GRPO and with APO (Megatron trainer, Ray CPU rollout fleet, weight sync); both runs
   attach to the one local Ray cluster the study starts;
4. pass@k (k = 1..eval_n) of reference / GRPO / APO on trained and held-out categories, with bootstrap CIs over
   prompts: a table, one sentence on what the figure shows, results.json, pass_at_k.png and dynamics.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_apo.study.config import ReferenceSection, StudyConfig, TaskSection

DEMO_SPLITS = ("trained", "heldout_easy", "heldout_hard")


@dataclass
class DemoConfig:
    seed: int = 1
    tp: int = 1
    num_categories: int = 96
    sft_steps: int = 3000
    rl_steps: int = 60
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    rl_lr: float = 1e-3
    eval_n: int = 64
    methods: dict = field(default_factory=lambda: {
        "grpo": ["algorithm.loss_mode=vanilla"],
        "apo": ["algorithm.loss_mode=apo_ratio"],
    })

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(num_categories=12, sft_steps=30, rl_steps=2, prompts_per_step=4, samples_per_prompt=4, eval_n=4)

    def study(self, out: Path) -> StudyConfig:
        rl = [
            "data.max_prompt_length=16", "data.max_response_length=6", f"data.train_batch_size={self.prompts_per_step}",
            f"rollout.n={self.samples_per_prompt}", "rollout.num_engines=1", "rollout.temperature=1.0",
            f"trainer.total_steps={self.rl_steps}", "trainer.ppo_epochs=2", f"trainer.lr={self.rl_lr}",
            "trainer.micro_batch_size=128", "algorithm.anchor_metrics=true",
        ]
        return StudyConfig(out_dir=str(out), tp=self.tp, task=TaskSection(num_categories=self.num_categories),
                           reference=ReferenceSection(sft_steps=self.sft_steps), rl=rl, seeds=[self.seed],
                           methods=dict(self.methods), eval_n=self.eval_n, bootstrap=1000)


def run_demo(cfg: DemoConfig, out: str | Path) -> dict:
    from megatron_apo.study.runner import run_study

    out = Path(out)
    t0 = time.time()
    print(f"demo: reference (SFT, {cfg.sft_steps} steps), then GRPO and APO for {cfg.rl_steps} RL steps each, "
          f"on the collapse task ({cfg.num_categories} categories); outputs in {out}", flush=True)
    results = run_study(cfg.study(out), out)
    table = demo_table(results)
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    print(format_demo_table(table, results["n"]))
    print(headline(table, results["n"]))
    print(f"demo: done in {(time.time() - t0) / 60:.1f} min; wrote {out}/results.json, {out}/pass_at_k.png and "
          f"{out}/dynamics.png", flush=True)
    return table


def demo_table(results: dict) -> dict:
    """{label: {split: {"pass@1": [est, lo, hi], "pass@n": [...]}}} for the demo's splits."""
    n = results["n"]
    table: dict = {}
    for label in results["labels"]:
        table[label] = {}
        for split in DEMO_SPLITS:
            e = results["splits"][split]["methods"][label]
            table[label][split] = {f"pass@{k}": [e["pass_at_k"][k - 1], e["ci_low"][k - 1], e["ci_high"][k - 1]]
                                   for k in sorted({1, n})}
    return table


def format_demo_table(table: dict, n: int) -> str:
    cols = [(s, k) for s in DEMO_SPLITS for k in sorted({1, n})]
    head = "| run | " + " | ".join(f"{s} pass@{k}" for s, k in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for label, row in table.items():
        cells = [row[s][f"pass@{k}"] for s, k in cols]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in cells) + " |")
    return "\n".join(lines)


def headline(table: dict, n: int) -> str:
    """One sentence saying what the figure shows, from the numbers."""
    ref, grpo = table["reference"], table.get("grpo")
    if grpo is None:
        return ""
    p1 = lambda r: r["trained"]["pass@1"][0]  # noqa: E731
    pn = lambda r: r["heldout_hard"][f"pass@{n}"][0]  # noqa: E731
    def moves(a: float, b: float) -> str:  # the sentence follows the numbers, whichever way they went
        verb = "rises" if b > a + 0.005 else "falls" if b < a - 0.005 else "stays"
        return f"{verb} {a:.2f} -> {b:.2f}"

    sharpens = p1(grpo) > p1(ref) + 0.005 and pn(grpo) < pn(ref) - 0.005
    s = (f"The figure shows {'GRPO sharpening and collapsing' if sharpens else 'GRPO'}: trained pass@1 "
         f"{moves(p1(ref), p1(grpo))} while held-out hard pass@{n} {moves(pn(ref), pn(grpo))}")
    if "apo" in table:
        s += f"; APO: trained pass@1 {p1(table['apo']):.2f}, held-out hard pass@{n} {pn(table['apo']):.2f}"
    return s + " (95% bootstrap CIs over prompts in the table; one seed)."
