#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the embedded CPU demo. Extra arguments go to `megatron-apo demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/megatron-apo demo "$@"
