#!/usr/bin/env bash
# The GPU measurements, as one call on a lent GPU machine (no registry there: llm-compressor and the
# packages its image lacks travel as wheels in .whl/, made here once and kept out of git by .git/info/exclude:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 auto-round==0.15.1 pydantic==2.14.4 \
#     pydantic_core==2.50.5 loguru==0.7.3 dill==0.4.1 multiprocess==0.70.19 annotated-types==0.8.0 typing-inspection==0.4.5
# ). Logs go under $OUT.
#   step-time: seconds per step of `objective: model` (end-to-end learning) on random-weight models of
#              SmolLM2-135M's and Llama-3.2-1B's full configurations (benchmarks/end_to_end_step_time.py);
#   kernels:   greedy, ria and the N:M mask on down_proj shapes (benchmarks/kernel_speed.py --device cuda);
#   scale:     benchmarks/scale.py on the Llama-3.2-1B layer shape (4 layers, vocabulary 4096), both pruners;
#   memory:    the modifier's own peak GPU memory on that shape, layers run in 1,024-token chunks and on the
#              whole sample at once (benchmarks/layer_pass_memory.py);
#   profile:   on that shape, the seconds of the modifier's main functions (layer_pass_memory.py --function-times);
#   live:      on that shape, the tensors alive at the modifier's peak (layer_pass_memory.py --live-tensors; slow).
#     bash benchmarks/device_checks.sh                 # all but profile and live
#     bash benchmarks/device_checks.sh kernels scale   # some
set -u
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
parts=${*:-step-time kernels scale memory}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, llmcompressor, learned_permutation; print('torch', torch.__version__, 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__)" 2>&1 | tail -3 | tee -a "$OUT/gpu.txt" || exit 1
if [[ " $parts " == *" step-time "* ]]; then
  for spec in "smollm2-135m-config 576,1536,30,9,3 49152" "llama-3.2-1b-config 2048,8192,16,32,8 128256"; do
    set -- $spec
    python3 -c "from pathlib import Path; from scale import random_llama; random_llama('$2', Path('/tmp/$1'), vocab=$3)" 2>&1 | tail -1
    timeout 120 python3 benchmarks/end_to_end_step_time.py /tmp/$1 --steps 5 --threads 16 2>&1 | tr '\r' '\n' | grep "per step" | tee -a "$OUT/end_to_end_step_time.txt"
  done
fi
if [[ " $parts " == *" kernels "* ]]; then
  timeout ${KERNELS_TIMEOUT:-120} python3 benchmarks/kernel_speed.py --device cuda --lockstep-only 2>&1 | grep -E "^(device|\|)" | tee "$OUT/kernel_speed.md"
fi
if [[ " $parts " == *" scale "* ]]; then
  timeout ${SCALE_TIMEOUT:-330} python3 benchmarks/scale.py --shape 2048,8192,4,32,8 --threads 16 --output "$OUT/llama-1b-layer-shape-gpu" 2>&1 | tee "$OUT/scale.log" | grep -E "^\|" | tail -4
fi
if [[ " $parts " == *" memory "* ]]; then
  timeout ${MEMORY_TIMEOUT:-150} python3 benchmarks/layer_pass_memory.py --threads 16 --chunk-tokens ${MEMORY_CHUNKS:-all 512} --output "$OUT/layer_pass_memory.md" 2>&1 | grep -E "^\|" | tee "$OUT/layer_pass_memory.log"
fi
for part in "profile function-times" "live live-tensors"; do
  set -- $part
  if [[ " $parts " == *" $1 "* ]]; then
    timeout ${PROFILE_TIMEOUT:-150} python3 benchmarks/layer_pass_memory.py --chunk-tokens 512 --$2 --threads 16 --output "$OUT/$2.md" 2>&1 | grep -E "^\|" | tee "$OUT/$2.log"
  fi
done
