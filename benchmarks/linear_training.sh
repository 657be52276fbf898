#!/usr/bin/env bash
# Training throughput of the linear attention families against softmax attention
# (docs/linear.md): the 100M-parameter models (100m: softmax; 100m_gla; 100m_supra) at 32,768
# tokens a step in rows of 2,048, 8,192 and 16,384 tokens, through bench_train's fast path
# (cuDNN for softmax, the fused linear attention kernel on a GPU), no remat.
#   bash benchmarks/linear_training.sh [OUT_DIR]        # STEPS=N timed steps (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
cases="fast:C=0,packing=1,batch=16,length=2048,remat=none"
cases+=";fast:C=0,packing=1,batch=4,length=8192,remat=none"
cases+=";fast:C=0,packing=1,batch=2,length=16384,remat=none"
for model in ${MODELS:-100m 100m_gla 100m_supra}; do
  python -m benchmarks.bench_train --parts throughput --model "$model" --mem-layers "" \
    --cases "${CASES:-$cases}" --steps "${STEPS:-5}" --warmup 2 \
    --json "$out/linear_training_$model.json"
done
