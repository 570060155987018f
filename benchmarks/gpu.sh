#!/usr/bin/env bash
# The GPU tables in one go, for a lent GPU machine with no network (about 7 minutes on an H200):
# sentiment (one epoch) and headlines (12 steps) for lora, reference, reference-tuned and lora-nf4,
# written as benchmarks/results/train-*-cuda.{md,json,png} and copied to $OUT.
#
# Here, before the run (the parts travel in the working tree; keep them under the 64 MiB it may carry):
#   python benchmarks/offline.py pack --out stage --models minilm-l6,smollm2-135m --part-mib 60
# On the GPU machine, from the repository root:
#   PARTS=stage bash benchmarks/gpu.sh
# With peftkit's dependencies already installed there, the unpack step installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-stage}
CACHE=${CACHE:-/root/pkc}
OUT=${OUT:-benchmarks/results}
ONLY=lora,reference,reference-tuned,lora-nf4

python benchmarks/offline.py unpack --parts "$PARTS" --to "$CACHE"
export PEFTKIT_CACHE=$CACHE PYTHONPATH=$CACHE/site:.
nvidia-smi --query-gpu=name,memory.total --format=csv
# each table gets a hard limit, so one stuck variant cannot cost the other table
timeout 200 python -m peftkit.cli bench train benchmarks/train-sentiment.yaml --only $ONLY || echo "sentiment: exit $?"
timeout 200 python -m peftkit.cli bench train benchmarks/train-headlines.yaml --only $ONLY || echo "headlines: exit $?"
if [ "$OUT" != benchmarks/results ]; then
    cp benchmarks/results/train-*-cuda.md benchmarks/results/train-*-cuda.json "$OUT"/ 2>/dev/null || true
fi
