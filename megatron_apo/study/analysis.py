"""The study's statistics and report: pass@k (k = 1..n) per split with paired bootstrap CIs, dynamics, criterion.

Uncertainty: a paired bootstrap over prompts and seeds. Each resample draws the seeds and the prompts with
replacement, once, and applies the same draw to every method, so a difference between two methods is
computed on the same prompts and seeds (paired). Reported: the point estimate (mean over seeds and prompts),
the 95% percentile interval, and the bootstrap standard error.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from megatron_apo.eval.pass_at_k import pass_at_k
from megatron_apo.study.config import StudyConfig

DYNAMICS = [("reward/mean", "reward"), ("entropy", "entropy (sampled positions)"), ("top1_prob", "top-1 probability"),
            ("anchor/safe_mass_wrong", "ref Top-K mass on wrong responses"), ("ref_kl", "KL to reference (k3)"),
            ("reward/distinct_correct", "distinct correct answers / prompt")]


def _pass_table(n: int) -> np.ndarray:
    """T[c, k-1] = pass@k for n samples with c correct, k = 1..n."""
    return np.array([[pass_at_k(n, c, k) for k in range(1, n + 1)] for c in range(n + 1)])


def _split_groups(sources: list[str]) -> dict[str, list[str]]:
    """overall, every data source (its name after the last '/'), and trained/heldout unions when named so."""
    short = {s: s.rsplit("/", 1)[-1] for s in sources}
    groups = {"overall": list(sources)}
    for word in ("trained", "heldout"):
        members = [s for s in sources if re.match(rf"{word}(_|$)", short[s])]
        if members:
            groups[word] = members
    for s in sources:
        groups.setdefault(short[s], [s])
    return groups


def load_counts(cfg: StudyConfig, out: Path) -> tuple[dict, list[int], list[str]]:
    """counts[label][seed] = {row: (n, correct, data_source)}; the reference from the runs' initial evals."""
    counts: dict[str, dict[int, dict]] = {}
    for method in cfg.methods:
        for seed in cfg.seeds:
            done = out / "runs" / method / f"seed_{seed}" / "done.json"
            if not done.is_file():
                continue
            rec = json.loads(done.read_text())
            for label, key in ((method, "final_eval"), (cfg.reference_label, "initial_eval")):
                if label == cfg.reference_label and seed in counts.get(label, {}):
                    continue
                res = json.loads(Path(rec[key]).read_text())
                counts.setdefault(label, {})[seed] = {p["row"]: (p["n"], p["correct"], p["data_source"])
                                                      for p in res["per_prompt"]}
    # only seeds every label has: the bootstrap pairs over them
    seeds = [s for s in cfg.seeds if all(s in per for per in counts.values())]
    labels = [cfg.reference_label] + [m for m in cfg.methods if m in counts]
    return {label: counts[label] for label in labels if label in counts}, seeds, labels


def analyse(cfg: StudyConfig, out: Path) -> dict:
    counts, seeds, labels = load_counts(cfg, out)
    if not seeds or cfg.baseline not in counts:
        return {"complete": False, "labels": labels, "seeds": seeds}
    rows = sorted(counts[cfg.reference_label][seeds[0]])
    n = counts[cfg.reference_label][seeds[0]][rows[0]][0]
    table = _pass_table(n)
    source = {r: counts[cfg.reference_label][seeds[0]][r][2] for r in rows}
    groups = _split_groups(sorted(set(source.values())))
    rng = np.random.default_rng(0)
    S = len(seeds)
    results = {"complete": all(len(counts.get(m, {})) == len(cfg.seeds) for m in cfg.methods),
               "n": n, "seeds": seeds, "labels": labels, "baseline": cfg.baseline,
               "reference": cfg.reference_label, "splits": {}}
    for gname, members in groups.items():
        grow = [r for r in rows if source[r] in members]
        P = len(grow)
        A = {label: np.stack([table[[counts[label][s][r][1] for r in grow]] for s in seeds])
             for label in labels}  # [S, P, n]
        ws = rng.multinomial(S, [1 / S] * S, size=cfg.bootstrap).astype(float)  # [B, S] seed draw counts
        wp = rng.multinomial(P, [1 / P] * P, size=cfg.bootstrap).astype(float)  # [B, P]
        boot = {label: np.einsum("bs,spk,bp->bk", ws, a, wp) / (S * P) for label, a in A.items()}
        split = {"num_prompts": P, "methods": {}}
        for label in labels:
            est = A[label].mean(axis=(0, 1))
            entry = {"pass_at_k": est.tolist(), "ci_low": np.percentile(boot[label], 2.5, axis=0).tolist(),
                     "ci_high": np.percentile(boot[label], 97.5, axis=0).tolist(),
                     "se": boot[label].std(axis=0).tolist()}
            for other in (cfg.baseline, cfg.reference_label):
                d = boot[label] - boot[other]
                entry[f"diff_vs_{other}"] = {"est": (est - A[other].mean(axis=(0, 1))).tolist(),
                                             "ci_low": np.percentile(d, 2.5, axis=0).tolist(),
                                             "ci_high": np.percentile(d, 97.5, axis=0).tolist(),
                                             "se": d.std(axis=0).tolist()}
            split["methods"][label] = entry
        results["splits"][gname] = split
    results["criterion"] = criterion(results, cfg)
    return results


def criterion(results: dict, cfg: StudyConfig) -> dict:
    """The pre-registered validity criterion of docs/science.md: GRPO raises trained pass@1 and lowers held-out
    hard pass@n below the reference, each by more than 2 (paired bootstrap) standard errors."""
    sp = results["splits"]
    if "trained" not in sp or "heldout_hard" not in sp:
        return {"applicable": False}
    g, ref = cfg.baseline, cfg.reference_label
    up = sp["trained"]["methods"][g]["diff_vs_" + ref]
    down = sp["heldout_hard"]["methods"][g]["diff_vs_" + ref]
    up_est, up_se = up["est"][0], up["se"][0]
    down_est, down_se = down["est"][-1], down["se"][-1]
    beats = {}
    for label in sp["trained"]["methods"]:
        if label in (g, ref):
            continue
        held = sp["heldout_hard"]["methods"][label]["diff_vs_" + g]
        tr = sp["trained"]["methods"][label]["diff_vs_" + g]
        beats[label] = bool(held["est"][-1] > 2 * held["se"][-1] and tr["est"][0] > -2 * tr["se"][0])
    return {"applicable": True, "beats_baseline": beats,
            "trained_pass1_gain": up_est, "trained_pass1_gain_se": up_se, "raises_trained_pass1": up_est > 2 * up_se,
            "heldout_hard_passn_change": down_est, "heldout_hard_passn_change_se": down_se,
            "lowers_heldout_hard_passn": -down_est > 2 * down_se,
            "met": bool(up_est > 2 * up_se and -down_est > 2 * down_se)}


def dynamics(cfg: StudyConfig, out: Path) -> dict:
    """Per method and metric: the mean over finished seeds of the per-step training metrics."""
    res: dict = {}
    for method in cfg.methods:
        hist = []
        for seed in cfg.seeds:
            done = out / "runs" / method / f"seed_{seed}" / "done.json"
            if done.is_file():
                hist.append(json.loads(done.read_text())["history"])
        if not hist:
            continue
        steps = min(len(h) for h in hist)
        res[method] = {key: [float(np.mean([h[i].get(key, math.nan) for h in hist])) for i in range(steps)]
                       for key, _ in DYNAMICS}
    return res


# ----------------------------------------------------------------------------------------------------------
# report


def _fmt(entry: dict, i: int) -> str:
    return f"{entry['pass_at_k'][i]:.3f} [{entry['ci_low'][i]:.3f}, {entry['ci_high'][i]:.3f}]"


def _fmt_diff(d: dict, i: int) -> str:
    return f"{d['est'][i]:+.3f} [{d['ci_low'][i]:+.3f}, {d['ci_high'][i]:+.3f}]"


def results_table(results: dict, split: str) -> str:
    n, base = results["n"], results["baseline"]
    sp = results["splits"][split]
    lines = [f"| method | pass@1 | pass@{n} | Δpass@1 vs {base} | Δpass@{n} vs {base} |", "|---|---|---|---|---|"]
    for label, e in sp["methods"].items():
        d = e[f"diff_vs_{base}"]
        diff = ("—", "—") if label == base else (_fmt_diff(d, 0), _fmt_diff(d, n - 1))
        lines.append(f"| {label} | {_fmt(e, 0)} | {_fmt(e, n - 1)} | {diff[0]} | {diff[1]} |")
    return "\n".join(lines)


def plot_pass_curves(results: dict, path: Path, splits: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(splits))
    rows = -(-len(splits) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(splits):]:
        ax.axis("off")
    ks = np.arange(1, results["n"] + 1)
    for ax, split in zip(axes.flat, splits):
        sp = results["splits"][split]
        for label, e in sp["methods"].items():
            line, = ax.plot(ks, e["pass_at_k"], linewidth=1.6, label=label,
                            linestyle="--" if label == results["reference"] else "-")
            ax.fill_between(ks, e["ci_low"], e["ci_high"], color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k (log scale)")
        ax.set_ylabel("pass@k")
        ax.set_title(f"{split} ({sp['num_prompts']} prompts)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"pass@k, 95% paired-bootstrap bands over prompts and {len(results['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dynamics(dyn: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for ax, (key, title) in zip(axes.flat, DYNAMICS):
        for method, series in dyn.items():
            v = series[key]
            if not all(math.isnan(x) for x in v):
                ax.plot(range(1, len(v) + 1), v, linewidth=1.3, label=method)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("training dynamics (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cfg: StudyConfig, results: dict, out: Path) -> None:
    dyn = dynamics(cfg, out)
    (out / "results.json").write_text(json.dumps({**results, "dynamics": dyn}) + "\n")
    if not results.get("splits"):
        (out / "report.md").write_text("# Study report\n\nNo finished run yet.\n")
        return
    order = [s for s in ("overall", "trained", "heldout", "trained_easy", "trained_hard", "heldout_easy",
                         "heldout_hard") if s in results["splits"]]
    order += [s for s in results["splits"] if s not in order]
    plot_pass_curves(results, out / "pass_at_k.png", [s for s in order if s != "overall"] or ["overall"])
    plot_dynamics(dyn, out / "dynamics.png")
    c = results["criterion"]
    lines = ["# Study report", "",
             f"Seeds: {results['seeds']}; pass@k from n = {results['n']} samples per prompt; 95% paired bootstrap "
             f"intervals over prompts and seeds ({cfg.bootstrap} resamples). Complete: {results['complete']}.", ""]
    if c.get("applicable"):
        lines += ["## Pre-registered criterion", "",
                  f"GRPO trained pass@1 − reference: {c['trained_pass1_gain']:+.3f} "
                  f"(SE {c['trained_pass1_gain_se']:.3f}); "
                  f"held-out hard pass@{results['n']} GRPO − reference: {c['heldout_hard_passn_change']:+.3f} "
                  f"(SE {c['heldout_hard_passn_change_se']:.3f}). **Criterion met: {c['met']}.**", "",
                  f"Beats {cfg.baseline} (held-out hard pass@{results['n']} higher by > 2 SE, trained pass@1 not lower "
                  "by > 2 SE): " + ", ".join(f"{m}: {'yes' if b else 'no'}"
                                             for m, b in c["beats_baseline"].items()), ""]
    for split in order:
        lines += [f"## {split} ({results['splits'][split]['num_prompts']} prompts)", "",
                  results_table(results, split), ""]
    lines += ["![pass@k](pass_at_k.png)", "", "![dynamics](dynamics.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
