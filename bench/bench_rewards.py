"""Math-reward throughput of the RewardPool: 1 worker process (baseline) vs N, same items, same run.

    python bench/bench_rewards.py [--items 1024] [--workers N]   # N: default the cores this process may use

The items are one RL step's batch of math-verify scoring (distinct answers, 4 forms). Prints samples/s for
both pools and the ratio against the 1-worker baseline, and ends with one JSON line.
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


def timed(items: list[RewardItem], workers: int) -> tuple[float, list[float]]:
    """samples/s of one pool over `items`, its workers started and warmed outside the timing."""
    with RewardPool(num_workers=workers, timeout_s=5.0) as pool:
        pool.score(make_items(8 * workers, seed=1))  # start the workers; math-verify's imports
        t = time.perf_counter()
        scores = pool.score(items).scores
        return len(items) / (time.perf_counter() - t), scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=None, help="default: the cores this process may use (>= 2)")
    args = ap.parse_args()
    workers = args.workers or max(2, len(os.sched_getaffinity(0)))
    items = make_items(args.items, seed=0)
    load_before = os.getloadavg()[0]  # on a shared machine the ratio means little without it
    r_one, base = timed(items, 1)
    r_many, scores = timed(items, workers)
    assert scores == base, "1-worker and N-worker scores differ"
    load = round(max(load_before, os.getloadavg()[0]), 1)
    print(f"1 worker:   {r_one:8.1f} samples/s")
    print(f"{workers} workers: {r_many:8.1f} samples/s  ratio {r_many / r_one:.2f}x  (load average {load})")
    print(json.dumps({"bench": "rewards_math", "items": len(items), "workers": workers,
                      "one_worker_samples_per_s": round(r_one, 1), "workers_samples_per_s": round(r_many, 1),
                      "ratio": round(r_many / r_one, 3), "mean_reward": round(sum(base) / len(items), 4),
                      "cores": len(os.sched_getaffinity(0)), "load_average": load}))


if __name__ == "__main__":
    main()
