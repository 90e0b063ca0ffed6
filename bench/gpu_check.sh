#!/usr/bin/env bash
# The prepared GPU check of issue 19: one command, at most 10 minutes on a CUDA machine.
#   bench/gpu_check.sh                      # every section (see bench/gpu_check.py)
#   bench/gpu_check.sh --only peak,pretrain # some of them
#   PYTHON=.venv/bin/python bench/gpu_check.sh --cpu-smoke --only pretrain --steps 12
# Prints RESULT {...} lines as sections finish and a summary at the end (also after a timeout).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
limit="${GPU_CHECK_LIMIT_S:-600}"
log="$(mktemp -t mlsteps-gpucheck-XXXXXX.log)"
cd "$repo" || exit 1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "nvidia-smi not found: GPU sections will print SKIP"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# The sections stop starting new work 30 s before the hard limit; timeout ends the rest.
timeout --signal=TERM --kill-after=10 "$limit" "$py" "$here/gpu_check.py" \
  --budget-s "$((limit - 30))" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "gpu_check: stopped at the ${limit} s limit"
"$py" "$here/gpu_check.py" --summarize "$log"
echo "full log: $log"
exit "$status"
