"""Check our vllm-2of4 export with compressed-tensors 0.14.0.1 itself (its own env; imports nothing of ours).

1. ITS ModelCompressor parses our quantization_config and picks its Sparse24BitMaskCompressor.
2. ITS decompressor restores every tensor of our export bit-exactly to llm-compressor's dense output.
3. ITS compressor, given that dense output, writes exactly the tensors (names, dtypes, shapes, bits) we wrote.
4. transformers 4.57.6 + compressed-tensors 0.14.0.1 (the stack that reads this layout) loads our
   export and our plain export, and both reproduce the dense logits transformers 5 computed; the
   RoPE theta and the tokenizer come through.

Usage: <ct-0.14.0.1 env>/bin/python verify/check_compressed_tensors.py WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from compressed_tensors import ModelCompressor
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

FAILURES: list[str] = []


def check(condition: bool, message: str) -> None:
    print(("PASS " if condition else "FAIL ") + message)
    if not condition:
        FAILURES.append(message)


def read(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            tensors.update({name: reader.get_tensor(name) for name in reader.keys()})
    return tensors


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = a.view(torch.int16 if a.element_size() == 2 else torch.int32), b.view(
            torch.int16 if b.element_size() == 2 else torch.int32)
    return torch.equal(a, b)


def same_tensors(ours: dict, theirs: dict, what: str) -> None:
    check(ours.keys() == theirs.keys(), f"{what}: same tensor names ({len(ours)})")
    differing = [name for name in ours.keys() & theirs.keys() if not identical(ours[name], theirs[name])]
    check(not differing, f"{what}: every tensor bit-identical" + (f" (differ: {sorted(differing)[:5]})" if differing else ""))


def main(work: Path) -> None:
    dense, export, plain = work / "pruned", work / "vllm-2of4", work / "plain"
    config = json.loads((export / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    check(type(compressor.sparsity_compressor).__name__ == "Sparse24BitMaskCompressor",
          f"ModelCompressor picks {type(compressor.sparsity_compressor).__name__} for our quantization_config")
    check(compressor.quantization_config is None, "no quantization scheme read from a sparse-only config")

    dense_tensors = read(dense)
    same_tensors(dict(compressor.sparsity_compressor.decompress(str(export))), dense_tensors,
                 "compressed-tensors' decompressor on our export vs llm-compressor's dense output")

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dense))
    same_tensors(compressor.compress(skeleton, state_dict=dict(dense_tensors)), read(export),
                 "compressed-tensors' compressor (targets Linear, ignore lm_head) vs our export")

    reference = torch.load(work / "reference.pt")
    for name, folder in (("vllm-2of4", export), ("plain", plain)):
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(reference["token_ids"]).logits
        error = (logits - reference["logits"]).abs().max().item()
        check(error < 1e-4, f"transformers 4.57 loads our {name} export; max |logit - transformers-5 dense| = {error:.2e}")
        check(model.config.rope_theta == 500000.0, f"transformers 4.57 reads rope_theta {model.config.rope_theta} from {name}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        same_ids = tokenizer(reference["text"], return_tensors="pt").input_ids.equal(reference["token_ids"])
        check(same_ids, f"transformers 4.57 loads the {name} tokenizer ({type(tokenizer).__name__}), same token ids as 5.x")
    if FAILURES:
        sys.exit(f"{len(FAILURES)} compressed-tensors check(s) failed")
    print("compressed-tensors 0.14.0.1: all checks passed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
