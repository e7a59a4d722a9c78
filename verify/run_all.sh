#!/usr/bin/env bash
# Verify the export formats against the released packages, in isolated environments.
#   1. build (once) the envs: compressed-tensors 0.14.0.1, vLLM 0.18.1, vLLM 0.33.0   (verify/build_envs.sh)
#   2. in the project env: prune a tiny Llama 2:4 with llm-compressor, export plain + vllm-2of4
#   3. check them with each package's own code
# Usage: verify/run_all.sh [WORK_DIR]      (PROJECT_PYTHON defaults to .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ENVS="${LP_VERIFY_ENVS:-$HOME/.cache/learned-permutation/verify-envs}"
PROJECT_PYTHON="${PROJECT_PYTHON:-.venv/bin/python}"
WORK="${1:-$(mktemp -d -t lp-verify-export-XXXXXX)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

LP_VERIFY_ENVS="$ENVS" bash verify/build_envs.sh
PYTHONPATH=src "$PROJECT_PYTHON" verify/make_checkpoints.py "$WORK" > "$WORK.make.log" 2>&1 \
  || { tail -30 "$WORK.make.log"; exit 1; }
status=0
for check in "ct-0.14.0.1 check_compressed_tensors.py" "vllm-0.18.1 check_vllm_0_18.py" "vllm-0.33.0 check_vllm_0_33.py"; do
  set -- $check
  echo "== $2 ($1)"
  "$ENVS/$1/bin/python" "verify/$2" "$WORK" 2> "$WORK.$1.log" | grep -E '^(PASS|FAIL|INFO [a-z])|checks passed' \
    || { status=1; tail -20 "$WORK.$1.log"; }
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
[[ $status -eq 0 ]] && echo "export verification: all passed" || echo "export verification: FAILED"
exit $status
