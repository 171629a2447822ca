#!/usr/bin/env bash
# Ready for a GPU: one command measuring the gpu profile's model on one CUDA device in under 8 minutes.
#
#   bash benchmarks/gpu.sh [--out result.json]   # pretrain tokens/s + MFU (eager and torch.compile),
#                                                # DPO pairs/s, MMLU items/s, generation tokens/s
#   bash benchmarks/gpu.sh --dry-run             # tiny shapes, 1+1 steps, runs on CPU (tests/test_gpu_script.py)
#
# Prints one JSON object on stdout (logs on stderr); without CUDA and without --dry-run it exits 2 before
# any work. What is measured, the step counts and time boxes: benchmarks/gpu.py's docstring.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PIPELINE_LOG_LEVEL="${PIPELINE_LOG_LEVEL:-WARNING}"
exec "$PY" benchmarks/gpu.py "$@"
