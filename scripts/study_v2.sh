#!/usr/bin/env bash
# The collapse study, version 2 (docs/science.md, "Version 2: pre-registration"), in its pre-registered order:
# tier 1 on task B, tier 1 on task A, then the sweeps and secondary methods (task B, 4 replicates). Resumable: rerun
# the same command after an interruption; finished runs are kept. Extra arguments go to every `megatron-apo study`.
set -euo pipefail
cd "$(dirname "$0")/.."
for cfg in configs/study_v2.yaml configs/study_v2_task_a.yaml configs/study_v2_sweeps.yaml; do
  .venv/bin/megatron-apo study --config "$cfg" "$@"
done
