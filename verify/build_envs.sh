#!/usr/bin/env bash
# Build the isolated environments that verify the export formats against the released packages.
# They never share a site-packages with the project: compressed-tensors 0.14.0.1 and vLLM 0.18.1
# need transformers 4.x, the project needs transformers 5.
#
#   ct-0.14.0.1  compressed-tensors 0.14.0.1 (last release with the sparse-24-bitmask compressor)
#                + transformers 4.57.6 (the stack that loads such checkpoints)
#   vllm-0.18.1  vllm 0.18.1 (last release with 2:4 kernels)  } each: vllm --no-deps, then every
#   vllm-0.33.0  vllm 0.33.0 (current)                         } requirement its wheel declares (so its
#                own compressed-tensors 0.13.0 / 0.17.0 and transformers 4.57.x / 5.x pins) except the
#                CUDA/torch stack ($VLLM_LEFT_OUT), with torch pinned to the local CPU build
#
# torch: vLLM pins CUDA torch builds (2.10.0 / 2.14.0, GBs). We reuse torch 2.13.0 (CPU, a local
# wheel on these machines); vllm's compiled extension fails to load (no libcudart) and vLLM carries
# on without it: the checks use its Python config, scheme, layer and loader code only.
#
# Usage: verify/build_envs.sh            (envs go to $LP_VERIFY_ENVS, default ~/.cache/learned-permutation/verify-envs)
set -euo pipefail

ENVS="${LP_VERIFY_ENVS:-$HOME/.cache/learned-permutation/verify-envs}"
PYTHON="${LP_VERIFY_PYTHON:-python3}"
TORCH_SPEC="${LP_VERIFY_TORCH:-torch==2.13.0}"
mkdir -p "$ENVS"

# vLLM's declared requirements left out: the CUDA/torch stack (torch is pinned instead), and certifi
# (vllm 0.33.0 asks for certifi>=2026.10.19, newer than the index had on 2026-11-23; offline checks
# need no CA bundle).
VLLM_LEFT_OUT='^(torch|torchaudio|torchvision|torchcodec|pynvvideocodec|flashinfer-python|apache-tvm-ffi|tilelang|nvidia-.*|nvtx|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|xformers|triton|certifi)$'

build() {  # build NAME INSTALLER ARGS...: create the venv once; a finished one (.complete) is kept
  local name=$1; shift
  local env="$ENVS/$name"
  if [[ -f "$env/.complete" ]]; then echo "[$name] ready at $env"; return; fi
  rm -rf "$env"
  local start=$SECONDS
  "$PYTHON" -m venv "$env"
  "$env/bin/pip" install -q --upgrade pip
  "$@" "$env"
  touch "$env/.complete"
  echo "[$name] built in $((SECONDS - start)) s at $env"
}

ct_env() {
  # psutil: compressed-tensors 0.14.0.1 imports it undeclared; accelerate: transformers 4.57 needs it to load compressed checkpoints
  "$1/bin/pip" install -q "$TORCH_SPEC" compressed-tensors==0.14.0.1 transformers==4.57.6 safetensors psutil "accelerate<=1.15"
}

vllm_env() {  # vllm_env VLLM-VERSION ENV: vllm without deps, then every declared requirement but $VLLM_LEFT_OUT
  local env=$2
  "$env/bin/pip" install -q --no-deps "vllm==$1"
  "$env/bin/pip" install -q packaging
  "$env/bin/python" - "$VLLM_LEFT_OUT" > "$env/vllm-requirements.txt" <<'PY'
import re, sys
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm"):
    requirement = Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    if not re.match(sys.argv[1], requirement.name.lower()):
        print(line.split(";")[0])
PY
  "$env/bin/pip" install -q "$TORCH_SPEC" -r "$env/vllm-requirements.txt"
  "$env/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_SPEC#torch==}') else 'torch was replaced')"
}

build ct-0.14.0.1 ct_env
build vllm-0.18.1 vllm_env 0.18.1
build vllm-0.33.0 vllm_env 0.33.0
