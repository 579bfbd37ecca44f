"""The study's statistics and report: pass@k (k = 1..n) per split with paired bootstrap CIs, dynamics, criterion.

Uncertainty: a paired bootstrap over prompts and seeds. Each resample draws the seeds and the prompts with
replacement, once, and applies the same draw to every method, so a difference between two methods is
computed on the same prompts and seeds (paired). Reported: the point estimate (mean over seeds and prompts),
the 95% percentile interval, and the bootstrap standard error.

Version 2 (docs/science.md): the unit is the replicate (a task instance x a seed). Each replicate's pass@k is
averaged over prompts, a method's difference to the baseline is taken per replicate (paired), and the 95% interval
is Student's t over replicates; the secondary comparisons are Holm-corrected. pass@k comes from sampled counts
(unbiased estimator) or from exact p(valid) (1 - (1 - p)^k), whichever the eval files hold.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from megatron_apo.eval.pass_at_k import pass_at_k
from megatron_apo.study.config import StudyConfig, endpoint_k, replicate_name, replicates, report_dir

DYNAMICS = [("reward/mean", "reward"), ("entropy", "entropy (sampled positions)"), ("top1_prob", "top-1 probability"),
            ("anchor/safe_mass_wrong", "ref Top-K mass on wrong responses"), ("ref_kl", "KL to reference (k3)"),
            ("reward/distinct_correct", "distinct correct answers / prompt"),
            ("apo/neg_grad_off_frac", "share of A < 0 tokens with gradient off")]


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


def _pass_vectors(res: dict, n: int, table: np.ndarray) -> dict:
    """{row: (data_source, pass@k for k = 1..n)} from a sampled (n samples, c correct) or an exact (p) eval file."""
    out = {}
    for p in res["per_prompt"]:
        if "p_valid" in p:
            vec = 1.0 - (1.0 - p["p_valid"]) ** np.arange(1, n + 1)
        else:
            if p["n"] != n:
                raise ValueError(f"study: an eval file has n = {p['n']} samples per prompt, expected eval_n = {n}")
            vec = table[p["correct"]]
        out[p["row"]] = (p["data_source"], vec)
    return out


def load_values(cfg: StudyConfig, out: Path) -> tuple[dict, list[str], list[str]]:
    """values[label][replicate] = {row: (data_source, pass@k vector)}; the reference from the runs' initial evals.
    Returns only the replicates every label has (the statistics pair over them)."""
    table = _pass_table(cfg.eval_n)
    values: dict[str, dict[str, dict]] = {}
    for method in cfg.methods:
        for instance, seed in replicates(cfg):
            rep = replicate_name(instance, seed)
            done = out / "runs" / method / rep / "done.json"
            if not done.is_file():
                continue
            rec = json.loads(done.read_text())
            for label, key in ((method, "final_eval"), (cfg.reference_label, "initial_eval")):
                if label == cfg.reference_label and rep in values.get(label, {}):
                    continue
                res = json.loads(Path(rec[key]).read_text())
                values.setdefault(label, {})[rep] = _pass_vectors(res, cfg.eval_n, table)
    reps = [replicate_name(i, s) for i, s in replicates(cfg)]
    reps = [r for r in reps if all(r in per for per in values.values())]
    labels = [cfg.reference_label] + [m for m in cfg.methods if m in values]
    return {label: values[label] for label in labels if label in values}, reps, labels


# ----------------------------------------------------------------------------------------------------------
# seed-level t statistics (no scipy: Student's t for integer degrees of freedom, Abramowitz & Stegun 26.7.3-4)


def t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with df >= 1 degrees of freedom."""
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:  # odd
        if df == 1:
            return 2 * theta / math.pi
        term, acc = c, c
        for i in range(3, df - 1, 2):
            term *= c * c * (i - 1) / i
            acc += term
        return 2 / math.pi * (theta + s * acc)
    term, acc = 1.0, 1.0
    for i in range(2, df - 1, 2):
        term *= c * c * (i - 1) / i
        acc += term
    return s * acc


def t_quantile_95(df: int) -> float:
    """The two-sided 95% critical value t_{0.975, df} (bisection on t_abs_cdf)."""
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_abs_cdf(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def t_interval(d: np.ndarray) -> dict:
    """Mean, SE, two-sided 95% t-interval and p-value (H0: mean 0) of per-replicate values d [S, ...]."""
    S = d.shape[0]
    est = d.mean(axis=0)
    if S < 2:
        nan = np.full_like(est, np.nan)
        return {"est": est.tolist(), "se": nan.tolist(), "ci_low": nan.tolist(), "ci_high": nan.tolist(),
                "p": nan.tolist(), "df": S - 1}
    se = d.std(axis=0, ddof=1) / math.sqrt(S)
    q = t_quantile_95(S - 1)
    tstat = np.divide(est, se, out=np.zeros_like(est), where=se > 0)
    p = np.array([1.0 - t_abs_cdf(float(x), S - 1) if s > 0 else float(e == 0) * 1.0
                  for x, s, e in zip(tstat.ravel(), se.ravel(), est.ravel())]).reshape(est.shape)
    return {"est": est.tolist(), "se": se.tolist(), "ci_low": (est - q * se).tolist(),
            "ci_high": (est + q * se).tolist(), "p": p.tolist(), "df": S - 1}


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> dict[str, dict]:
    """Holm's step-down correction: adjusted p-values and which hypotheses are rejected at `alpha`."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out, rejecting = len(order), 0.0, {}, True
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        rejecting = rejecting and pvalues[key] <= alpha / (m - i)
        out[key] = {"p": pvalues[key], "p_holm": running, "rejected": rejecting}
    return out


# ----------------------------------------------------------------------------------------------------------


def analyse(cfg: StudyConfig, out: Path) -> dict:
    values, reps, labels = load_values(cfg, out)
    if not reps or cfg.baseline not in values:
        return {"complete": False, "labels": labels, "seeds": reps}
    n = cfg.eval_n
    groups = _split_groups(sorted({src for rep in reps for src, _ in values[cfg.reference_label][rep].values()}))
    rng = np.random.default_rng(0)
    S = len(reps)
    results = {"complete": all(len(values.get(m, {})) == len(replicates(cfg)) for m in cfg.methods),
               "n": n, "seeds": reps, "labels": labels, "baseline": cfg.baseline, "eval_mode": cfg.eval_mode,
               "reference": cfg.reference_label, "splits": {}}
    for gname, members in groups.items():
        # per replicate, the group's rows in row order (task instances hold the same number of rows per split)
        grows = {rep: sorted(r for r, (src, _) in values[cfg.reference_label][rep].items() if src in members)
                 for rep in reps}
        sizes = {len(v) for v in grows.values()}
        if len(sizes) != 1:
            raise ValueError(f"study: split {gname!r} has {sorted(sizes)} prompts in different replicates; the "
                             "paired statistics need the same number in each")
        P = sizes.pop()
        A = {label: np.stack([np.stack([values[label][rep][r][1] for r in grows[rep]]) for rep in reps])
             for label in labels}  # [S, P, n]
        ws = rng.multinomial(S, [1 / S] * S, size=cfg.bootstrap).astype(float)  # [B, S] seed draw counts
        wp = rng.multinomial(P, [1 / P] * P, size=cfg.bootstrap).astype(float)  # [B, P]
        boot = {label: np.einsum("bs,spk,bp->bk", ws, a, wp) / (S * P) for label, a in A.items()}
        seed_means = {label: a.mean(axis=1) for label, a in A.items()}  # [S, n]: each replicate averaged over prompts
        split = {"num_prompts": P, "methods": {}}
        for label in labels:
            est = A[label].mean(axis=(0, 1))
            entry = {"pass_at_k": est.tolist(), "ci_low": np.percentile(boot[label], 2.5, axis=0).tolist(),
                     "ci_high": np.percentile(boot[label], 97.5, axis=0).tolist(),
                     "se": boot[label].std(axis=0).tolist(), "seed_t": t_interval(seed_means[label])}
            for other in (cfg.baseline, cfg.reference_label):
                d = boot[label] - boot[other]
                entry[f"diff_vs_{other}"] = {"est": (est - A[other].mean(axis=(0, 1))).tolist(),
                                             "ci_low": np.percentile(d, 2.5, axis=0).tolist(),
                                             "ci_high": np.percentile(d, 97.5, axis=0).tolist(),
                                             "se": d.std(axis=0).tolist(),
                                             "seed_t": t_interval(seed_means[label] - seed_means[other])}
            split["methods"][label] = entry
        results["splits"][gname] = split
    results["criterion"] = criterion(results, cfg)
    results["comparisons"] = comparisons(results, cfg)
    diag = report_dir(cfg, out) / "diagnostics.json"  # the precondition of this config's own replicates
    if diag.is_file():
        results["diagnostics"] = json.loads(diag.read_text())
    results["criterion_v2"] = criterion_v2(results, cfg, out)
    return results


def hard_endpoints(results: dict) -> list[str]:
    """The v2 endpoints: trained-hard and held-out-hard prompts, each its own."""
    return [s for s in ("heldout_hard", "trained_hard") if s in results["splits"]]


def comparisons(results: dict, cfg: StudyConfig) -> dict:
    """Every method against the baseline on the hard endpoints at pass@endpoint_k: seed-level paired t-intervals;
    the primary methods at alpha 0.05 each, the secondary ones Holm-corrected together (per endpoint)."""
    k = endpoint_k(cfg) - 1
    out = {}
    for split in hard_endpoints(results):
        methods = results["splits"][split]["methods"]
        rows = {m: {key: v[k] for key, v in methods[m][f"diff_vs_{cfg.baseline}"]["seed_t"].items() if key != "df"}
                for m in methods if m not in (cfg.baseline, cfg.reference_label)}
        secondary = {m: r["p"] for m, r in rows.items() if m not in cfg.primary and not math.isnan(r["p"])}
        adjusted = holm(secondary)
        for m, r in rows.items():
            r["role"] = "primary" if m in cfg.primary else "secondary"
            if m in adjusted:
                r.update(p_holm=adjusted[m]["p_holm"], significant=adjusted[m]["rejected"])
            else:
                r["significant"] = bool(r["ci_low"] > 0 or r["ci_high"] < 0)
        out[split] = {"k": endpoint_k(cfg), "methods": rows}
    return out


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


def run_histories(cfg: StudyConfig, out: Path) -> dict[str, dict[str, list[dict]]]:
    """Per method (in config order) and replicate: the finished run's per-step training metrics (done.json), each
    file read once for every use below."""
    res: dict[str, dict[str, list[dict]]] = {}
    for method in cfg.methods:
        for instance, seed in replicates(cfg):
            done = out / "runs" / method / replicate_name(instance, seed) / "done.json"
            if done.is_file():
                res.setdefault(method, {})[replicate_name(instance, seed)] = json.loads(done.read_text())["history"]
    return res


def late_means(histories: dict, key: str, last: int = 20) -> dict[str, dict[str, float]]:
    """Per method and replicate: the mean of a training metric over the last `last` steps (nan if not logged)."""
    res: dict[str, dict[str, float]] = {}
    for method, per_rep in histories.items():
        for rep, history in per_rep.items():
            vals = [h.get(key, math.nan) for h in history[-last:]]
            res.setdefault(method, {})[rep] = float(np.mean(vals)) if vals else math.nan
    return res


def criterion_v2(results: dict, cfg: StudyConfig, out: Path) -> dict:
    """The version-2 pre-registered criterion (docs/science.md, "Version 2: pre-registration"), points 1-5, for the
    first primary method against the baseline; `None` where a check's input was not measured."""
    if not cfg.primary or "heldout_hard" not in results["splits"]:
        return {"applicable": False}
    apo, g, ref, k = cfg.primary[0], cfg.baseline, cfg.reference_label, endpoint_k(cfg) - 1
    sp = results["splits"]
    if apo not in sp["heldout_hard"]["methods"]:
        return {"applicable": False}
    reps = results["seeds"]
    # 1. validity: GRPO lowers the held-out hard endpoint below the reference by more than 3 seed-level SE
    v = sp["heldout_hard"]["methods"][g][f"diff_vs_{ref}"]["seed_t"]
    validity = bool(v["est"][k] < 0 and -v["est"][k] > 3 * v["se"][k])
    # 2. mechanism precondition: measured by study/diagnostics.py when the report has it
    diag = results.get("diagnostics", {}).get(g)
    mechanism = None if diag is None else bool(diag["valid_in_ref_topk_frac"] >= 0.8
                                                and diag["median_mass_outside_ref_topk"] >= 0.1)
    # 3. manipulation check: safe-manifold mass on wrong responses above GRPO's by > 2 SE, < 20% gradient off
    histories = run_histories(cfg, out)
    mass = late_means(histories, "anchor/safe_mass_wrong")
    off = late_means(histories, "apo/neg_grad_off_frac")
    manipulation, m_stats, off_frac = None, None, None
    if apo in mass and g in mass and all(r in mass[apo] and r in mass[g] for r in reps):
        d = np.array([mass[apo][r] - mass[g][r] for r in reps])
        if not np.isnan(d).any():
            m_stats = t_interval(d[:, None])
            m_stats = {key: (val[0] if isinstance(val, list) else val) for key, val in m_stats.items()}
            off_frac = float(np.nanmean([off.get(apo, {}).get(r, math.nan) for r in reps]))
            manipulation = bool(m_stats["est"] > 2 * m_stats["se"] and off_frac < 0.2)
    # 4. primary: exact pass@k on held-out hard prompts, improvement >= 0.05 with the 95% interval above 0; trained
    # pass@1 not lower than the baseline's by more than 0.02
    p = sp["heldout_hard"]["methods"][apo][f"diff_vs_{g}"]["seed_t"]
    tr = sp["trained"]["methods"][apo][f"diff_vs_{g}"]["seed_t"] if "trained" in sp else None
    primary = bool(p["est"][k] >= 0.05 and p["ci_low"][k] > 0 and (tr is None or tr["est"][0] >= -0.02))
    # 5. the verdict
    checks = (validity, mechanism, manipulation)
    if all(c is True for c in checks):
        verdict = f"{apo} improves on {g}" if primary else f"{apo} does not improve on {g}"
    else:
        verdict = "inconclusive"
    return {"applicable": True, "method": apo, "k": endpoint_k(cfg),
            "validity": validity, "validity_est": v["est"][k], "validity_se": v["se"][k],
            "mechanism": mechanism, "mechanism_stats": diag,
            "manipulation": manipulation, "safe_mass_diff": m_stats, "neg_grad_off_frac": off_frac,
            "primary": primary, "primary_est": p["est"][k], "primary_ci": [p["ci_low"][k], p["ci_high"][k]],
            "trained_pass1_diff": None if tr is None else tr["est"][0], "verdict": verdict}


LATE_DIAGNOSTICS = [("anchor/safe_mass_wrong", "mass on S (wrong)"), ("apo/neg_grad_off_frac", "A<0 grad off"),
                    ("pg_clipfrac", "clip frac"), ("top1_prob", "top-1 prob"), ("entropy", "entropy"),
                    ("ref_kl", "KL to ref"), ("reward/mean", "reward")]


def late_diagnostics(histories: dict, last: int = 20) -> dict[str, dict[str, float]]:
    """Per method: each diagnostic's mean over the last `last` steps, averaged over the finished replicates; with
    `algorithm.position_metrics`, the per-position shares of A < 0 tokens with gradient off (`pos/...`) too."""
    keys = [k for k, _ in LATE_DIAGNOSTICS]
    for per_rep in histories.values():  # the per-position keys the runs logged (a method's first run)
        last_step = next(iter(per_rep.values()))[-1]
        keys += sorted((k for k in last_step if k.startswith("pos/neg_grad_off_frac_") and k not in keys),
                       key=lambda k: int(k.rsplit("_", 1)[1]))
    res: dict[str, dict[str, float]] = {}
    for key in keys:
        for method, per_rep in late_means(histories, key, last).items():
            vals = [v for v in per_rep.values() if not math.isnan(v)]
            res.setdefault(method, {})[key] = float(np.mean(vals)) if vals else math.nan
    return res


def diagnostics_table(diag: dict[str, dict[str, float]]) -> str:
    if not diag:
        return ""
    names = dict(LATE_DIAGNOSTICS)
    keys = list(dict.fromkeys(k for d in diag.values() for k in d))
    head = [names[k] if k in names else "A<0 off @" + k.rsplit("_", 1)[1] for k in keys]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, d in diag.items():
        lines.append(f"| {method} | " + " | ".join("—" if math.isnan(d.get(k, math.nan)) else f"{d[k]:.3f}"
                                                   for k in keys) + " |")
    return "\n".join(lines)


def dynamics(histories: dict) -> dict:
    """Per method and metric: the mean over finished replicates of the per-step training metrics."""
    res: dict = {}
    for method, per_rep in histories.items():
        hist = list(per_rep.values())
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
        methods = [m for m in sp["methods"] if m != results["reference"]]
        for label, e in sp["methods"].items():  # the methods' colours as in dynamics.png; the reference black
            ref = label == results["reference"]
            color = "k" if ref else f"C{methods.index(label) % 10}"
            ax.plot(ks, e["pass_at_k"], linewidth=1.6, label=label, linestyle="--" if ref else "-", color=color)
            ax.fill_between(ks, e["ci_low"], e["ci_high"], color=color, alpha=0.15, linewidth=0)
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

    fig, axes = plt.subplots(2, 4, figsize=(17, 7), squeeze=False)
    for ax in axes.flat[len(DYNAMICS):]:
        ax.axis("off")
    colors = {m: f"C{i % 10}" for i, m in enumerate(dyn)}  # one colour per method in every panel
    for ax, (key, title) in zip(axes.flat, DYNAMICS):
        for method, series in dyn.items():
            v = series[key]
            if not all(math.isnan(x) for x in v):  # a metric the method does not log: no line, same colours
                ax.plot(range(1, len(v) + 1), v, linewidth=1.3, label=method, color=colors[method])
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("training dynamics (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ci(r: dict) -> str:
    return f"{r['est']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def v2_section(results: dict) -> list[str]:
    """The version-2 criterion and the endpoint comparisons (seed-level paired t-intervals, Holm)."""
    c, lines = results.get("criterion_v2", {}), []
    if c.get("applicable"):
        lines += ["## Version-2 criterion", "",
                  f"1. validity (GRPO lowers held-out hard pass@{c['k']} by > 3 SE): {c['validity']} "
                  f"({c['validity_est']:+.3f}, SE {c['validity_se']:.3f})",
                  f"2. mechanism precondition: {c['mechanism']} ({c['mechanism_stats']})",
                  f"3. manipulation check: {c['manipulation']} (safe-manifold mass difference {c['safe_mass_diff']}, "
                  f"share of A < 0 tokens with gradient off {c['neg_grad_off_frac']})",
                  f"4. primary ({c['method']} − baseline, held-out hard pass@{c['k']} ≥ 0.05, 95% interval above 0; "
                  f"trained pass@1 not below by > 0.02): {c['primary']} ({c['primary_est']:+.3f} "
                  f"[{c['primary_ci'][0]:+.3f}, {c['primary_ci'][1]:+.3f}]; trained pass@1 {c['trained_pass1_diff']})",
                  f"5. **verdict: {c['verdict']}**", ""]
    for split, comp in results.get("comparisons", {}).items():
        lines += [f"### {split}: pass@{comp['k']} − {results['baseline']} (seed-level paired 95% t-intervals over "
                  f"{len(results['seeds'])} replicates; secondary comparisons Holm-corrected)", "",
                  "| method | role | difference [95% CI] | p | p (Holm) | significant |", "|---|---|---|---|---|---|"]
        for m, r in comp["methods"].items():
            holm_p = f"{r['p_holm']:.3f}" if "p_holm" in r else "—"
            lines.append(f"| {m} | {r['role']} | {_ci(r)} | {r['p']:.3f} | {holm_p} | {r['significant']} |")
        lines.append("")
    return lines


def write_report(cfg: StudyConfig, results: dict, out: Path, report: Path | None = None) -> None:
    """Writes results.json, report.md and the plots to `report` (default: the study folder `out`)."""
    histories = run_histories(cfg, out)
    dyn, late = dynamics(histories), late_diagnostics(histories)
    out = Path(report or out)  # from here on: where the report goes
    (out / "results.json").write_text(json.dumps({**results, "dynamics": dyn, "late_diagnostics": late}) + "\n")
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
             f"Replicates: {results['seeds']}; pass@k for k = 1..{results['n']} "
             f"({'exact' if results.get('eval_mode') == 'exact' else 'sampled, n samples per prompt'}); "
             "95% paired bootstrap "
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
    lines += v2_section(results)
    if late:
        lines += ["## Diagnostics (mean of the last 20 RL steps, over replicates)", "",
                  "Mass on S: the reference Top-K's policy mass on wrong responses; A<0 grad off: the share of "
                  "negative tokens whose gradient is zero (APO forms and the artifact control); A<0 off @i: the same "
                  "at response position i (0 where a method logs none).", "", diagnostics_table(late), ""]
    for split in order:
        lines += [f"## {split} ({results['splits'][split]['num_prompts']} prompts)", "",
                  results_table(results, split), ""]
    lines += ["![pass@k](pass_at_k.png)", "", "![dynamics](dynamics.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
