"""Check our vllm-2of4 export with compressed-tensors 0.14.0.1 itself (its own env; imports nothing of ours).

1. ITS ModelCompressor parses our quantization_config and picks its Sparse24BitMaskCompressor.
2. ITS decompressor restores every tensor of our export bit-exactly to llm-compressor's dense output.
3. ITS compressor, given that dense output, writes exactly the tensors (names, dtypes, shapes, bits) we wrote.
4. transformers 4.57.6 + compressed-tensors 0.14.0.1 (the stack that reads this layout) loads our
   export and our plain export, and both reproduce the dense logits transformers 5 computed; the
   RoPE theta and the tokenizer come through.
5. FP8 W8A8 + 2:4 (fp8-dynamic, fp8-static: llm-compressor's QuantizationModifier after pruning):
   ITS ModelCompressor reads our config as Sparse24BitMaskCompressor + FloatQuantizationCompressor
   with the checkpoint's FP8 scheme; ITS sparsity decompressor returns llm-compressor's FP8 weights
   bit-exactly and the scales by value (we store them in float32, vLLM's dtype); ITS sparsity
   compressor, run on llm-compressor's quantized tensors (its compress_model order: quantization
   first, sparsity second), writes exactly our compressed/bitmask/shape tensors; transformers 4.57
   decompresses our export to the same model as llm-compressor's own FP8 checkpoint (same logits).

Usage: <ct-0.14.0.1 env>/bin/python verify/check_compressed_tensors.py WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from compressed_tensors import ModelCompressor
from compressed_tensors.utils import match_named_modules
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils.quantization_config import CompressedTensorsConfig

FAILURES: list[str] = []
FP8_CHECKPOINTS = ("fp8-dynamic", "fp8-static")
BITMASK_PARTS = ("compressed", "bitmask", "shape")


def check(condition: bool, message: str) -> None:
    print(("PASS " if condition else "FAIL ") + message)
    if not condition:
        FAILURES.append(message)


def read(folder: Path) -> dict[str, torch.Tensor]:
    """The weights as transformers finds them: the files the index names, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() else [folder / "model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as reader:
            tensors.update({name: reader.get_tensor(name) for name in reader.keys()})
    return tensors


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}
        a, b = a.view(bits[a.element_size()]), b.view(bits[b.element_size()])
    return torch.equal(a, b)


def same_tensors(ours: dict, theirs: dict, what: str) -> None:
    check(ours.keys() == theirs.keys(), f"{what}: same tensor names ({len(ours)})")
    differing = [name for name in ours.keys() & theirs.keys() if not identical(ours[name], theirs[name])]
    check(not differing, f"{what}: every tensor bit-identical" + (f" (differ: {sorted(differing)[:5]})" if differing else ""))


def decompressed_logits(folder: Path, token_ids: torch.Tensor, config=None) -> torch.Tensor:
    """Logits of a compressed-tensors checkpoint that transformers 4.57 decompresses to bf16 (no FP8 on CPU)."""
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    with torch.no_grad():
        return model(token_ids).logits


def check_fp8(work: Path, name: str, token_ids: torch.Tensor) -> None:
    theirs, export = work / name, work / f"{name}-2of4"
    config = json.loads((export / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    quantizers = {key: type(value).__name__ for key, value in (compressor.quantization_compressor or {}).items()}
    check(type(compressor.sparsity_compressor).__name__ == "Sparse24BitMaskCompressor"
          and quantizers == {"float-quantized": "FloatQuantizationCompressor"},
          f"{name}: ModelCompressor reads our config as {type(compressor.sparsity_compressor).__name__} + {quantizers}")
    scheme = compressor.quantization_config.config_groups["group_0"]
    check(scheme.weights.type == scheme.input_activations.type == "float" and scheme.weights.num_bits == 8,
          f"{name}: FP8 W8A8 scheme (weights {scheme.weights.strategy}, activations {scheme.input_activations.strategy}, "
          f"dynamic={scheme.input_activations.dynamic})")

    original, ours = read(theirs), read(export)
    decompressed = dict(compressor.sparsity_compressor.decompress(str(export)))
    check(decompressed.keys() == original.keys(), f"{name}: decompression restores every tensor name ({len(original)})")
    weights = [key for key in original if original[key].dtype == torch.float8_e4m3fn]
    differing = [key for key in weights if not identical(decompressed[key], original[key])]
    check(len(weights) == 14 and not differing,
          f"{name}: compressed-tensors' decompressor gives llm-compressor's {len(weights)} FP8 weights bit-exactly"
          + (f" (differ: {differing[:4]})" if differing else ""))
    others = [key for key in original if key not in weights]
    check(all(torch.equal(decompressed[key].float(), original[key].float()) for key in others),
          f"{name}: the other {len(others)} tensors (scales in float32 now, norms, embeddings) keep their values")

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(theirs))
    targets = {module_name for module_name, _ in match_named_modules(skeleton, ["Linear"], ["lm_head"])}
    theirs_compressed = compressor.sparsity_compressor.compress(dict(original), compression_targets=targets)
    parts = [key for key in ours if key.rpartition(".")[2] in BITMASK_PARTS]
    check(len(parts) == 3 * 14 and {key for key in theirs_compressed if key.rpartition(".")[2] in BITMASK_PARTS} == set(parts)
          and all(identical(ours[key], theirs_compressed[key]) for key in parts),
          f"{name}: compressed-tensors' sparsity compressor on llm-compressor's FP8 weights writes exactly our {len(parts)} 2:4 tensors")

    fixed = AutoConfig.from_pretrained(theirs)  # its transformers-5 config reads RoPE theta 10000 in 4.57 (see check 4)
    fixed.rope_theta = AutoConfig.from_pretrained(export).rope_theta
    error = (decompressed_logits(export, token_ids) - decompressed_logits(theirs, token_ids, fixed)).abs().max().item()
    check(error == 0.0, f"{name}: transformers 4.57 decompresses our export to llm-compressor's own FP8 model "
          f"(max |logit difference| = {error:.2e})")


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
    for name in FP8_CHECKPOINTS:
        check_fp8(work, name, reference["token_ids"])
    if FAILURES:
        sys.exit(f"{len(FAILURES)} compressed-tensors check(s) failed")
    print("compressed-tensors 0.14.0.1: all checks passed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
