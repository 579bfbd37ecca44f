"""Math-reward throughput: in-process (baseline) vs RewardPool worker processes, same items, same run.

    python bench/bench_rewards.py [--items 400] [--workers 2]

Prints samples/s for both, the speed-up ratio, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    items = make_items(args.items, seed=0)
    with RewardPool(num_workers=0) as serial:
        serial.score(items[:20])  # warm math-verify's caches/imports the same way the workers do
        t = time.perf_counter()
        base = serial.score(items)
        t_serial = time.perf_counter() - t
    with RewardPool(num_workers=args.workers) as pool:
        pool.score(items[:20])  # start workers outside the timing
        t = time.perf_counter()
        par = pool.score(items)
        t_pool = time.perf_counter() - t
    assert par.scores == base.scores, "pool and in-process scores differ"
    r_serial, r_pool = len(items) / t_serial, len(items) / t_pool
    print(f"in-process: {r_serial:8.1f} samples/s ({t_serial:.2f} s)")
    print(f"pool x{args.workers}:    {r_pool:8.1f} samples/s ({t_pool:.2f} s)  speed-up {r_pool / r_serial:.2f}x")
    print(json.dumps({"bench": "rewards_math", "items": len(items), "workers": args.workers,
                      "serial_samples_per_s": round(r_serial, 1), "pool_samples_per_s": round(r_pool, 1),
                      "speedup": round(r_pool / r_serial, 3), "mean_reward": sum(base.scores) / len(items)}))


if __name__ == "__main__":
    main()
