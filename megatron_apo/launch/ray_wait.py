"""Waits until a Ray cluster has N alive nodes; the Slurm scripts call it before the trainer starts.

    python -m megatron_apo.launch.ray_wait --address HOST:PORT --nodes N [--timeout 300]

Exits 0 once N nodes are alive (printing their resources), 1 on timeout naming how many joined.
"""

from __future__ import annotations

import argparse
import sys
import time


def alive_nodes(address: str) -> list[dict]:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    return [n for n in ray.nodes() if n.get("Alive")]


def wait_for_nodes(address: str, nodes: int, timeout: float = 300.0, poll: float = 1.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    alive: list[dict] = []
    while time.monotonic() < deadline:
        try:
            alive = alive_nodes(address)
        except ConnectionError:  # the head's GCS is not listening yet
            time.sleep(poll)
            continue
        if len(alive) >= nodes:
            return alive
        time.sleep(poll)
    raise TimeoutError(f"ray cluster at {address}: {len(alive)} of {nodes} nodes joined within {timeout:.0f} s; "
                       f"check the ray start logs of the missing nodes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    try:
        alive = wait_for_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as e:
        print(f"ray_wait: {e}", file=sys.stderr)
        return 1
    for n in alive:
        res = {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}
        print(f"ray_wait: node {n['NodeManagerAddress']}:{n['NodeManagerPort']} {res}", flush=True)
    print(f"ray_wait: {len(alive)} nodes alive", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
