"""Check our exports with vLLM 0.18.1's own code (its own env; imports nothing of ours).

This machine has no GPU, so vLLM runs up to, not including, its CUDA kernels: its config parsing,
its scheme selection, its real Linear layers and weight loaders, and its bitmask decompression.
1. config: transformers 4.57 + vLLM's `patch_rope_parameters` give RoPE theta 500000 for both
   exports (and 10000 for llm-compressor's raw transformers-5 config: why export rewrites it).
2. `CompressedTensorsConfig.from_config` accepts our quantization_config.
3. For every decoder Linear, vLLM's real fused layers (QKVParallelLinear, MergedColumnParallelLinear,
   RowParallelLinear) get the `CompressedTensors24` scheme; lm_head does not. Our tensors load into
   the parameters its `create_weights` registered, through its weight loaders, with matching
   names, shapes and dtypes; its `_decompress_bitmask_compressed_weight` returns llm-compressor's
   dense weights bit-exactly; and the shapes pass the asserts of `cutlass_sparse_compress`
   (k % 8) and `cutlass_scaled_sparse_mm` (n % 16, k/2 % 16) that run next on a GPU.
4. FP8 W8A8 + 2:4 exports (fp8-dynamic, fp8-static): the same, and the scheme is the quantized
   CompressedTensors24 (FP8 weights); the weight scales (float32 per channel, or one per fused part)
   and static input scales load into the float32 parameters it registers, with the values
   llm-compressor wrote, and its `convert_to_channelwise` (process_weights_after_loading) gives every
   row its part's scale; the decompressed weights are llm-compressor's FP8 weights bit-exactly.
5. vLLM's own weight-file selection (`DefaultModelLoader._prepare_weights`) reads only the weight
   files of our exports, not the modifier's permutations.safetensors beside them.
One patch: `sparse_cutlass_supported` (False without CUDA) is made to return True so that
`create_weights` runs on the CPU; nothing else of vLLM is replaced.

Usage: <vllm-0.18.1 env>/bin/python verify/check_vllm_0_18.py WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig
from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import compressed_tensors_24
from vllm.model_executor.layers.quantization.utils.w8a8_utils import convert_to_channelwise
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.transformers_utils.config import patch_rope_parameters

FAILURES: list[str] = []
FP8_EXPORTS = ("fp8-dynamic", "fp8-static")
BITMASK_PARTS = ("compressed", "bitmask", "shape")
SCALES = ("weight_scale", "input_scale")


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


def rope_theta_seen_by_vllm(folder: Path) -> float:
    config = AutoConfig.from_pretrained(folder)
    patch_rope_parameters(config)
    return config.rope_parameters["rope_theta"]


def vllm_layers(config, quant_config) -> dict[str, torch.nn.Module]:
    """vLLM's real Linear layers for one Llama decoder layer (tensor parallel size 1), by fused name."""
    dtype = getattr(torch, config.torch_dtype) if isinstance(config.torch_dtype, str) else config.torch_dtype
    head_dim = config.hidden_size // config.num_attention_heads
    common = dict(bias=False, quant_config=quant_config, params_dtype=dtype)
    prefix = "model.layers.{}"
    return {
        "self_attn.qkv_proj": lambda i: QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                                          config.num_key_value_heads, prefix=f"{prefix.format(i)}.self_attn.qkv_proj", **common),
        "self_attn.o_proj": lambda i: RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                                        prefix=f"{prefix.format(i)}.self_attn.o_proj", **common),
        "mlp.gate_up_proj": lambda i: MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                                 prefix=f"{prefix.format(i)}.mlp.gate_up_proj", **common),
        "mlp.down_proj": lambda i: RowParallelLinear(config.intermediate_size, config.hidden_size,
                                                     prefix=f"{prefix.format(i)}.mlp.down_proj", **common),
    }


def shard_ids(fused: str) -> list[tuple[str, object]]:
    """Checkpoint Linears feeding a vLLM layer, with the shard id vLLM's Llama loader passes."""
    leaf = fused.rsplit(".", 1)[-1]
    parts = LlamaForCausalLM.packed_modules_mapping.get(leaf)
    if parts is None:
        return [(leaf, None)]
    return [(part, part[0] if leaf == "qkv_proj" else index) for index, part in enumerate(parts)]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


def check_layer(layer: torch.nn.Module, fused: str, export: dict, dense: dict, consumed: set, label: str) -> None:
    name = f"{label}: {fused}"
    scheme = getattr(layer, "scheme", None)
    quantized = bool(getattr(scheme, "quantized", False))
    check(type(scheme).__name__ == "CompressedTensors24",
          f"{name}: vLLM picks CompressedTensors24" + (f" (quantized, {scheme.weights_dtype})" if quantized else ""))
    parent = fused.rsplit(".", 1)[0]
    params = dict(layer.named_parameters())
    parts = [*BITMASK_PARTS, *(scale for scale in SCALES if quantized and scale in params)]
    dense_rows, scales = [], {scale: [] for scale in SCALES}
    for part, shard in shard_ids(fused):
        for suffix in parts:
            key = f"{parent}.{part}.{suffix}"
            tensor = export[key]
            consumed.add(key)
            param = params[suffix]
            check(tensor.dtype == param.dtype, f"{label}: {key}: dtype {tensor.dtype} = registered {param.dtype}")
            loader_args = (param, tensor) if shard is None else (param, tensor, shard)
            param.weight_loader(*loader_args)
            if suffix in SCALES:
                scales[suffix].append(tensor)
        dense_rows.append(dense[f"{parent}.{part}.weight"])
    expected = torch.cat(dense_rows)
    check(tuple(params["compressed"].shape) == (expected.shape[0], expected.shape[1] // 2)
          and tuple(params["bitmask"].shape) == (expected.shape[0], expected.shape[1] // 8),
          f"{name}: registered compressed {tuple(params['compressed'].shape)} / bitmask {tuple(params['bitmask'].shape)} fit the checkpoint")
    decoded = layer.scheme._decompress_bitmask_compressed_weight(layer.compressed, layer.bitmask, layer)
    check(decoded.dtype == expected.dtype and torch.equal(bits(decoded), bits(expected)),
          f"{name}: vLLM's decompression = llm-compressor's {str(expected.dtype).removeprefix('torch.')} weight, bit-exact")
    n, k = decoded.shape
    check(k % 8 == 0 and n % 16 == 0 and (k // 2) % 16 == 0, f"{name}: n={n}, k={k} pass the CUTLASS 2:4 shape asserts")
    if quantized:
        check_scales(layer, name, scales, expected.shape[0])


def check_scales(layer: torch.nn.Module, name: str, scales: dict, rows: int) -> None:
    """The loaded scales hold llm-compressor's values; per row after vLLM's own channelwise conversion."""
    per_tensor = layer.weight_scale.numel() == len(layer.logical_widths)
    loaded = (convert_to_channelwise(layer.weight_scale, layer.logical_widths) if per_tensor
              else layer.weight_scale.data)
    expected = torch.cat([scale.reshape(-1, 1).expand(width, 1) if per_tensor else scale
                          for scale, width in zip(scales["weight_scale"], layer.logical_widths)])
    check(loaded.shape == (rows, 1) and torch.equal(loaded, expected.float()),
          f"{name}: weight scales ({'per tensor, ' + str(len(layer.logical_widths)) + ' parts' if per_tensor else 'per channel'}) "
          "load as llm-compressor wrote them, one per output row after convert_to_channelwise")
    if scales["input_scale"]:
        check(all(torch.equal(layer.input_scale.data, scale) for scale in scales["input_scale"]),
              f"{name}: static input scale {layer.input_scale.item():.6g} loaded, the same for every fused part")
    else:
        check(not hasattr(layer, "input_scale") and layer.scheme.input_quant.dynamic,
              f"{name}: dynamic per-{layer.scheme.input_quant.strategy} activation scales, no input_scale registered")


def weight_files_vllm_reads(folder: Path) -> list[str]:
    _, files, _ = DefaultModelLoader(LoadConfig())._prepare_weights(str(folder), None, None, True, None)
    return sorted(Path(file).name for file in files)


def check_export(export_dir: Path, dense_dir: Path, label: str) -> None:
    """vLLM 0.18.1's config parsing, scheme choice, weight loading and decompression on one export."""
    config = AutoConfig.from_pretrained(export_dir)
    quant_config = CompressedTensorsConfig.from_config(json.loads((export_dir / "config.json").read_text())["quantization_config"])
    check(set(quant_config.sparsity_scheme_map) == {"Linear"}, f"{label}: CompressedTensorsConfig.from_config accepts our quantization_config")
    files = weight_files_vllm_reads(export_dir)
    check(files == ["model.safetensors"], f"{label}: vLLM's loader reads only the weights: {files}")
    export, dense = read(export_dir), read(dense_dir)
    consumed: set[str] = set()
    for index in range(config.num_hidden_layers):
        for fused, build in vllm_layers(config, quant_config).items():
            check_layer(build(index), f"model.layers.{index}.{fused}", export, dense, consumed, label)
    head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config, prefix="lm_head")
    check(type(head.quant_method).__name__ == "UnquantizedEmbeddingMethod", f"{label}: lm_head stays dense in vLLM")
    leftover = sorted(name for name in export.keys() - consumed if not name.endswith(".weight"))
    check(not leftover, f"{label}: every compressed tensor of the export is loaded by a vLLM layer (left over: {leftover[:5]})")
    dense_only = sorted(name for name in export if name.endswith(".weight"))
    check(all(torch.equal(export[name], dense[name]) for name in dense_only),
          f"{label}: the {len(dense_only)} tensors vLLM loads densely (embeddings, norms, lm_head) are unchanged")


def main(work: Path) -> None:
    dense_dir, export_dir, plain_dir = work / "pruned", work / "vllm-2of4", work / "plain"
    for folder in (export_dir, plain_dir):
        theta = rope_theta_seen_by_vllm(folder)
        check(theta == 500000.0, f"vLLM 0.18.1 config path reads RoPE theta {theta} from {folder.name}")
    raw = rope_theta_seen_by_vllm(dense_dir)
    print(f"INFO llm-compressor's own transformers-5 config gives RoPE theta {raw} in vLLM 0.18.1 (true: 500000)")
    print(f"INFO vLLM 0.18.1 would read these files of llm-compressor's own {FP8_EXPORTS[0]} folder: "
          f"{weight_files_vllm_reads(work / FP8_EXPORTS[0])}")

    compressed_tensors_24.sparse_cutlass_supported = lambda: True  # no CUDA here; see the module doc
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:29517")
        initialize_model_parallel(1, 1)
        check_export(export_dir, dense_dir, "vllm-2of4")
        for name in FP8_EXPORTS:
            check_export(work / f"{name}-2of4", work / name, f"{name}-2of4")
    if FAILURES:
        sys.exit(f"{len(FAILURES)} vLLM 0.18.1 check(s) failed")
    print("vLLM 0.18.1: all checks passed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
