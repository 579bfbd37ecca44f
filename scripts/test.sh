#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Every process the tests start carries this mark, daemons that left our session included (Ray, a vLLM engine
# core, the local Slurm daemons). Whatever still carries it when pytest is done is stopped, so no leftover holds
# this command's output open or its machine busy after the summary.
MEGATRON_APO_TEST_RUN="$$-$(date +%s)"
export MEGATRON_APO_TEST_RUN
status=0
.venv/bin/python -m pytest "$@" || status=$?
.venv/bin/python scripts/reap_marked.py MEGATRON_APO_TEST_RUN "$MEGATRON_APO_TEST_RUN" || true
exit "$status"
