"""Math-reward throughput of the RewardPool: 1 worker process (baseline) vs N, same items, same run.

    python bench/bench_rewards.py [--items 1024] [--workers N] [--repeats 3]   # N: the cores it may use

The items are one RL step's batch of math-verify scoring (distinct answers, 4 forms). Both pools time the same
items, alternately, `--repeats` times each; the best samples/s of each pool and their ratio are printed (the
1-worker pool is the baseline), and the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from megatron_apo.rewards import RewardItem, RewardPool


def make_items(n: int, seed: int) -> list[RewardItem]:
    """Distinct answers (math-verify caches parses, so repeats would flatter the in-process baseline)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 999)
        form = i % 4
        if form == 0:
            ans, gt = f"\\frac{{{a}}}{{{b}}}", f"{a / b:.12f}"
        elif form == 1:
            ans, gt = f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"
        elif form == 2:
            ans, gt = f"[{a}, {a + b})", f"[{a},{a + b})"
        else:
            ans, gt = f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2" if rng.random() < 0.7 else f"(x+{b})^2"
        filler = " ".join(rng.choice(["so", "thus", "we get", "hence"]) for _ in range(50))
        items.append(RewardItem("math", f"{filler} \\boxed{{{ans}}}", gt))
    return items


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=None, help="default: the cores this process may use (>= 2)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timings of each pool; the best counts")
    args = ap.parse_args()
    workers = args.workers or max(2, len(os.sched_getaffinity(0)))
    items = make_items(args.items, seed=0)
    load_before = os.getloadavg()[0]  # on a shared machine the ratio means little without it
    rates: dict[int, list[float]] = {1: [], workers: []}
    scores: dict[int, list[float]] = {}
    with RewardPool(num_workers=1) as one, RewardPool(num_workers=workers) as many:
        for n, pool in ((1, one), (workers, many)):
            pool.score(make_items(8 * n, seed=1))  # start the workers; math-verify's imports
        # alternate 1, N, 1, N, ...: a burst of load from other jobs hits both, and the best of each counts
        for _ in range(args.repeats):
            for n, pool in ((1, one), (workers, many)):
                t = time.perf_counter()
                scores[n] = pool.score(items).scores
                rates[n].append(len(items) / (time.perf_counter() - t))
    assert scores[1] == scores[workers], "1-worker and N-worker scores differ"
    r_one, r_many = max(rates[1]), max(rates[workers])
    load = round(max(load_before, os.getloadavg()[0]), 1)
    print(f"1 worker:   {r_one:8.1f} samples/s  (runs: {', '.join(f'{r:.1f}' for r in rates[1])})")
    print(f"{workers} workers: {r_many:8.1f} samples/s  (runs: {', '.join(f'{r:.1f}' for r in rates[workers])})"
          f"  ratio {r_many / r_one:.2f}x  (load average {load})")
    print(json.dumps({"bench": "rewards_math", "items": len(items), "workers": workers, "repeats": args.repeats,
                      "one_worker_samples_per_s": round(r_one, 1), "workers_samples_per_s": round(r_many, 1),
                      "ratio": round(r_many / r_one, 3), "mean_reward": round(sum(scores[1]) / len(items), 4),
                      "cores": len(os.sched_getaffinity(0)), "load_average": load}))


if __name__ == "__main__":
    main()
