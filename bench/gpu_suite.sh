#!/usr/bin/env bash
# The one-shot GPU suite (bench/gpu_suite.py): versions, ceilings, train steps, kernels vs
# torch.compile, kernel tests, compiled train steps — in under 8 minutes on a lent H200.
#
#   bash bench/gpu_suite.sh                      # full; on the device: run tool, command `bash bench/gpu_suite.sh`
#   GPU_SUITE_QUICK=1 bash bench/gpu_suite.sh    # ~3-minute smoke
#   bash bench/gpu_suite.sh --cpu                # dry run on a CPU with tiny sizes
#
# Files go to $OUT (the device tool returns them) or /tmp/fastflow_gpu_suite; the summary table is
# printed last. Runs from the source tree (PYTHONPATH), installs nothing.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
if [ -n "${GPU_SUITE_PYTHON:-}" ]; then PY=$GPU_SUITE_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
OUT_DIR=${OUT:-${TMPDIR:-/tmp}/fastflow_gpu_suite}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# Backstop only: the Python orchestrator keeps its own deadline (450 s full, 180 s quick, 420 s
# --cpu, or --budget) and ends its children on SIGTERM.
backstop=${GPU_SUITE_TIMEOUT:-470}
prev=""
for arg in "$@"; do
  case "$prev" in --budget) backstop=$(( ${arg%.*} + 30 )) ;; esac
  case "$arg" in --budget=*) value=${arg#--budget=}; backstop=$(( ${value%.*} + 30 )) ;; esac
  prev=$arg
done
timeout -k 15 "$backstop" "$PY" bench/gpu_suite.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_suite.log"
exit "${PIPESTATUS[0]}"
