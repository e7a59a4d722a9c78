"""Check our plain export with vLLM 0.33.0's own config path (its own env; imports nothing of ours).

`vllm.config.ModelConfig` is what `vllm serve` / `LLM(...)` build first: it reads config.json with
transformers 5, inspects the architecture in a subprocess and names the quantization method; the
model loader then builds that method's config with `get_quant_config`.
1. The plain export: accepted, no quantization method, bf16, RoPE theta 500000.
2. The vllm-2of4 export: `get_quant_config` refuses it with vLLM's sparsity DeprecationWarning, the
   reason the plain format exists (vLLM >= 0.24 rejects any sparsity_config with targets; >= 0.19
   has no 2:4 kernels).
No GPU is needed for this part of vLLM.

Usage: <vllm-0.33.0 env>/bin/python verify/check_vllm_0_33.py WORK_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from vllm.config import LoadConfig, ModelConfig
from vllm.model_executor.model_loader.weight_utils import get_quant_config

FAILURES: list[str] = []


def check(condition: bool, message: str) -> None:
    print(("PASS " if condition else "FAIL ") + message)
    if not condition:
        FAILURES.append(message)


def main(work: Path) -> None:
    plain = ModelConfig(model=str(work / "plain"), tokenizer=str(work / "plain"))
    check(plain.quantization is None, f"vLLM 0.33.0 accepts the plain export, quantization={plain.quantization}")
    check(plain.dtype == torch.bfloat16, f"vLLM 0.33.0 serves it in {plain.dtype}")
    theta = plain.hf_config.rope_parameters["rope_theta"]
    check(theta == 500000.0, f"vLLM 0.33.0 reads RoPE theta {theta}")
    sparse = ModelConfig(model=str(work / "vllm-2of4"), tokenizer=str(work / "vllm-2of4"))
    try:
        get_quant_config(sparse, LoadConfig())
        refused = ""
    except DeprecationWarning as error:
        refused = str(error)
    check("Sparsity support has been removed" in refused,
          "vLLM 0.33.0 refuses the vllm-2of4 export (sparsity config), as expected: it is for vLLM 0.18.1")
    if FAILURES:
        sys.exit(f"{len(FAILURES)} vLLM 0.33.0 check(s) failed")
    print("vLLM 0.33.0: all checks passed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
