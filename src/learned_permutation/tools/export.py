"""Export a pruned checkpoint for the runtime that will serve it.

llm-compressor 0.14 saves a 2:4 model as a plain dense checkpoint (zeros in ``P.weight``, no
sparsity metadata). That loads everywhere but runs at dense speed. Real 2:4 speed exists only in
vLLM <= 0.18.1 on Hopper, which reads compressed-tensors' legacy ``sparse-24-bitmask`` layout.
Two formats, so one pruning run serves both worlds:

- ``plain``: the ordinary checkpoint with any sparsity metadata removed (and any bitmask-compressed
  weight decoded back to ``P.weight``). Loads in transformers, lm-eval and every vLLM.
- ``vllm-2of4``: every decoder Linear stored as ``P.compressed`` / ``P.bitmask`` / ``P.shape``
  plus the ``quantization_config.sparsity_config`` that vLLM 0.18.1 reads. Refused unless every
  decoder Linear is exactly 2:4 and fits the 0.18.1 kernels. A bf16/fp16 checkpoint gives the
  sparse-only scheme; an FP8 W8A8 checkpoint (llm-compressor's QuantizationModifier, schemes
  ``FP8_DYNAMIC`` / ``FP8``) keeps its quantization groups and gets the FP8 2:4 scheme: the FP8
  weights are bitmask-compressed as compressed-tensors 0.14.0.1 compresses them (quantization
  first, sparsity second), scales stored in the float32 that vLLM registers. Anything else
  quantized is refused: vLLM 0.18.1 has no 2:4 kernel for it.

Both write ``config.json`` and ``tokenizer_config.json`` so transformers 4.57 (vLLM 0.18.1's) reads
them right: without a top-level ``rope_theta`` it silently falls back to 10000 and vLLM 0.18.1 copies
that over the ``rope_parameters`` transformers 5 writes; and it has no ``TokenizersBackend`` class.

Output is built in a temporary folder beside the target and renamed into place at the end, so a
refused or failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file

from learned_permutation.math.masks import pack_bits, unpack_bits
from learned_permutation.plugin.artifacts import PERMUTATIONS_FILE
from learned_permutation.tools.output import staged_output
from learned_permutation_cli import EXPORT_FORMATS

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "decode_24_bitmask",
    "encode_24_bitmask",
    "export_checkpoint",
    "export_in_place",
    "read_dense_weights",
]

BITMASK_PARTS = ("compressed", "bitmask", "shape")
KERNEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FP8 = torch.float8_e4m3fn
# Name endings of compressed-tensors' quantization parameters: never cast with the model's dtype.
QUANTIZATION_PARAM_SUFFIXES = ("_scale", "_zero_point", "_g_idx")
# What vLLM 0.18.1's CompressedTensors24 takes (compressed_tensors.py supports_cutlass_24, create_weights).
SERVED_WEIGHT_STRATEGIES = ("tensor", "channel")
SERVED_INPUT_STRATEGIES = ("tensor", "token")
FP8_FORMAT = "float-quantized"
# compressed-tensors release whose sparse-24-bitmask layout we write (the last one that has it).
COMPRESSED_TENSORS_LAYOUT_VERSION = "0.14.0.1"
# vLLM fuses these checkpoint Linears into one layer; the 2:4 GEMM sees their stacked rows.
VLLM_FUSED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
WEIGHT_INDEX_FILE = "model.safetensors.index.json"


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format; the message says why and how to fix it."""


# --------------------------------------------------------------------------- 2:4 bitmask layout


def _magnitude_rank(weight: torch.Tensor) -> torch.Tensor:
    """What compressed-tensors 0.14.0.1's ``get_24_bytemasks`` ranks entries by: |w|, for FP8 on the
    int8 view of its bytes (so -0.0, byte 0x80, ranks below +0.0). Same order, same bitmask bytes."""
    return weight.view(torch.int8).abs() if weight.dtype == FP8 else weight.abs()


def _groups_over_24(weight: torch.Tensor) -> int:
    """Number of 4-column groups (along the input dim) holding more than 2 non-zeros."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    return int(((groups != 0).sum(-1) > 2).sum())


def _kept_positions_24(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept positions per group of 4: the top-2 |w| (every non-zero of a 2:4 group).

    A group with fewer than 2 non-zeros still stores 2 values (the layout is a fixed C/2 per row).
    Which zeros fill it is torch.topk's tie order on compressed-tensors' ranking, the same call it
    makes, so our bitmask bytes equal its compressor's (verify/check_compressed_tensors.py); any choice decodes
    to the same weights.
    """
    groups = weight.reshape(weight.shape[0], -1, 4)
    top2 = _magnitude_rank(groups).topk(2, dim=-1).indices
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return kept.reshape(weight.shape)


def encode_24_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A dense 2:4 weight [R, C] -> compressed-tensors' sparse-24-bitmask parts.

    ``compressed`` [R, C/2] holds the kept values row-major, ``bitmask`` [R, ceil(C/8)] uint8 marks
    their columns, ``shape`` int64 [[R], [C]]. Raises ExportError if the weight is not 2:4.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ExportError(f"2:4 needs a 2-D weight whose input dim is a multiple of 4, got {tuple(weight.shape)}")
    if over := _groups_over_24(weight):
        raise ExportError(f"weight is not 2:4: {over} groups of 4 input columns hold more than 2 non-zeros")
    kept = _kept_positions_24(weight)
    rows, cols = weight.shape
    return {
        "compressed": weight[kept].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_bits(kept),
        "shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
    }


def decode_24_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_24_bitmask` (also reads checkpoints written by compressed-tensors)."""
    rows, cols = (int(v) for v in shape.flatten())
    kept = unpack_bits(bitmask, cols)
    dense = torch.zeros(rows, cols, dtype=compressed.dtype, device=compressed.device)
    dense[kept] = compressed.flatten()
    return dense


# --------------------------------------------------------------------------- reading a checkpoint


def _weight_files(in_dir: Path) -> list[Path]:
    index = in_dir / WEIGHT_INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [in_dir / name for name in names]
    files = sorted(path for path in in_dir.glob("*.safetensors") if path.name != PERMUTATIONS_FILE)
    if not files:
        raise ExportError(
            f"{in_dir} holds no *.safetensors weights; save the model with "
            "save_pretrained(..., safe_serialization=True) first"
        )
    return files


def _shard_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One shard's tensors, with bitmask-compressed Linears decoded back to ``P.weight``."""
    with safe_open(path, framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    bitmask_prefixes = [name[: -len(".bitmask")] for name in tensors if name.endswith(".bitmask")]
    for prefix in bitmask_prefixes:
        parts = [tensors.pop(f"{prefix}.{part}", None) for part in BITMASK_PARTS]
        if any(part is None for part in parts):
            raise ExportError(f"{path.name}: {prefix} has a bitmask but not all of {BITMASK_PARTS} in one shard")
        tensors[f"{prefix}.weight"] = decode_24_bitmask(*parts)
    return tensors


def read_dense_weights(checkpoint_dir: str | Path) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield (shard file name, dense tensors) for every shard; bitmask layouts come back dense."""
    for path in _weight_files(Path(checkpoint_dir)):
        yield path.name, _shard_tensors(path)


# --------------------------------------------------------------------------- config.json


def _with_transformers4_keys(config: dict) -> dict:
    """Add the legacy RoPE keys that transformers 4.x (and so vLLM 0.18.1) reads.

    transformers 5 writes ``rope_parameters`` only; transformers 4.57 ignores it, defaults
    ``rope_theta`` to 10000, and vLLM 0.18.1 then overwrites the real theta with that default.
    transformers 5 reads the legacy keys back into the same ``rope_parameters``.
    """
    rope = config.get("rope_parameters")
    if not rope:
        return config
    if "rope_theta" not in rope:
        raise ExportError(
            "config.json rope_parameters has no rope_theta (per-layer-type RoPE?); "
            "it cannot be written in the transformers 4.x form vLLM 0.18.1 reads"
        )
    legacy = dict(config, rope_theta=rope["rope_theta"])
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = scaling
    return legacy


def _plain_config(config: dict) -> dict:
    """Drop sparsity metadata; keep a quantization_config only if it really quantizes or transforms."""
    quantization = dict(config.get("quantization_config") or {})
    quantization.pop("sparsity_config", None)
    plain = {key: value for key, value in config.items() if key != "quantization_config"}
    if quantization.get("config_groups") or quantization.get("transform_config"):
        plain["quantization_config"] = quantization
    return plain


def _served_quantization(config: dict) -> dict | None:
    """The checkpoint's quantization_config if vLLM 0.18.1 serves it with 2:4 (FP8 W8A8), None when
    not quantized; ExportError naming each reason otherwise.

    vLLM 0.18.1 sends a 2:4 Linear to ``CompressedTensors24`` only for 8-bit weights *and* activations,
    weights per tensor or per channel, activations per tensor (static or dynamic) or per token
    (dynamic); weight-only schemes fall through to kernels that cannot read the 2:4 layout. INT8 W8A8,
    which it would also take, is not exported: only FP8 is checked against its code here, and
    compressed-tensors 0.14.0.1 ranks int8 entries with torch's abs, where abs(-128) wraps to -128, so
    its own 2:4 compressor drops -128 weights (measured), the value symmetric int8 gives a row's
    largest negative weight.
    """
    quantization = config.get("quantization_config") or {}
    if quantization.get("transform_config"):
        raise ExportError("vllm-2of4: this checkpoint carries a transform_config (rotations); vLLM 0.18.1's 2:4 kernels do not apply transforms")
    groups = quantization.get("config_groups") or {}
    if not groups:
        return None
    fix = "quantize with QuantizationModifier scheme FP8_DYNAMIC or FP8 (recipes/*_fp8_*.yaml), or export 'plain'"
    problems = []
    if len(groups) > 1:
        problems.append(f"{len(groups)} quantization groups; vllm-2of4 exports one FP8 W8A8 scheme for every decoder Linear")
    if quantization.get("format") != FP8_FORMAT:
        problems.append(f"format {quantization.get('format')!r}, not {FP8_FORMAT!r}")
    if quantization.get("kv_cache_scheme"):
        problems.append("a kv_cache_scheme (KV-cache quantization is not verified with the 2:4 export)")
    for name, group in groups.items():
        weights, inputs = group.get("weights"), group.get("input_activations")
        if weights is None or inputs is None:
            problems.append(f"{name}: weight-only or activation-only quantization; vLLM 0.18.1 serves 2:4 only with W8A8 "
                            "(weight-only + 2:4 falls to kernels that cannot read the 2:4 layout)")
            continue
        if group.get("format") not in (None, FP8_FORMAT) or group.get("output_activations"):
            problems.append(f"{name}: format {group.get('format')!r} or output activation quantization")
        for role, args, strategies in (("weights", weights, SERVED_WEIGHT_STRATEGIES), ("input_activations", inputs, SERVED_INPUT_STRATEGIES)):
            if args.get("type") != "float" or args.get("num_bits") != 8 or not args.get("symmetric", True):
                problems.append(f"{name}.{role}: {args.get('num_bits')}-bit {args.get('type')} (symmetric={args.get('symmetric')}); only symmetric 8-bit float (FP8) is exported")
            if args.get("strategy") not in strategies:
                problems.append(f"{name}.{role}: strategy {args.get('strategy')!r}; vLLM 0.18.1's 2:4 kernels take {' or '.join(strategies)}")
        if weights.get("dynamic"):
            problems.append(f"{name}.weights: dynamic weight quantization")
        if not inputs.get("dynamic") and inputs.get("strategy") != "tensor":
            problems.append(f"{name}.input_activations: static scales must be per tensor")
    if problems:
        raise ExportError("cannot export vllm-2of4 from this quantized checkpoint (" + fix + "):\n  - " + "\n  - ".join(problems))
    return {key: value for key, value in quantization.items() if key not in ("sparsity_config", "transform_config", "version")}


def _vllm_2of4_config(config: dict, global_sparsity: float, quantization: dict | None) -> dict:
    """The quantization_config compressed-tensors 0.14.0.1 writes for a 2:4 model, sparse-only or with
    the checkpoint's FP8 groups, which vLLM 0.18.1 reads."""
    sparse = dict(config)
    sparse["quantization_config"] = {
        **(quantization or {}),
        "quant_method": "compressed-tensors",
        "version": COMPRESSED_TENSORS_LAYOUT_VERSION,
        "sparsity_config": {
            "format": "sparse-24-bitmask",
            "sparsity_structure": "2:4",
            "targets": ["Linear"],
            # vLLM's lm_head is not a LinearBase; listing it documents intent (vLLM ignores `ignore`).
            "ignore": ["lm_head"],
            "global_sparsity": global_sparsity,
        },
        "transform_config": {},
    }
    return sparse


# --------------------------------------------------------------------------- vllm-2of4 checks


def _decoder_linear_names(in_dir: Path) -> list[str]:
    """Names of every nn.Linear except the output head: what vLLM 0.18.1 runs through the 2:4 GEMM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(in_dir)
    if hasattr(config, "quantization_config"):  # structure only: no quantizer on a meta model
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head]


def _fused_layer_name(linear_name: str) -> str:
    parent, _, leaf = linear_name.rpartition(".")
    for fused, parts in VLLM_FUSED_LINEARS.items():
        if leaf in parts:
            return f"{parent}.{fused}"
    return linear_name


def _kernel_constraint_problems(shapes: dict[str, tuple[int, int]]) -> list[str]:
    """vLLM 0.18.1 (tensor parallel size 1) limits on each Linear and on each fused layer.

    - ``CompressedTensors24.create_weights``: every output partition divisible by 8;
    - ``cutlass_scaled_sparse_mm``: the fused layer's rows and its C/2 compressed columns divisible by 16.
    """
    problems = [f"{name}: output size {rows} is not a multiple of 8" for name, (rows, _) in shapes.items() if rows % 8]
    problems += [f"{name}: input size {cols} is not a multiple of 32" for name, (_, cols) in shapes.items() if cols % 32]
    fused_rows: dict[str, int] = {}
    for name, (rows, _) in shapes.items():
        fused = _fused_layer_name(name)
        fused_rows[fused] = fused_rows.get(fused, 0) + rows
    problems += [f"{name}: fused output size {rows} is not a multiple of 16" for name, rows in fused_rows.items() if rows % 16]
    return problems


def _first(items: list[str], count: int = 8) -> str:
    shown = "; ".join(items[:count])
    return shown + (f"; ... ({len(items)} in all)" if len(items) > count else "")


class _TwoFourEncoder:
    """Replaces each targeted ``P.weight`` by its bitmask parts, collecting every refusal before raising.

    ``quantization`` (the served FP8 config, or None) decides what a targeted weight must be: FP8 with
    its ``weight_scale`` (and ``input_scale`` for static activations), or float16/bfloat16. The scales
    are written in float32, the dtype vLLM 0.18.1's ``create_weights`` registers (bf16 -> fp32 is exact).
    """

    def __init__(self, targets: list[str], quantization: dict | None):
        self.targets = set(targets)
        self.pending = {f"{name}.weight" for name in targets}
        self.quantized = quantization is not None
        group = next(iter(quantization["config_groups"].values())) if quantization else {}
        self.scale_names = ("weight_scale",) + (() if group.get("input_activations", {}).get("dynamic", True) else ("input_scale",))
        self.scales: dict[str, torch.Tensor] = {}
        self.not_24: list[str] = []
        self.bad_dtype: list[str] = []
        self.shapes: dict[str, tuple[int, int]] = {}
        self.zeros = 0
        self.total = 0

    def encode_shard(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoded = {}
        for name, tensor in tensors.items():
            prefix, _, leaf = name.rpartition(".")
            if self.quantized and prefix in self.targets and leaf in self.scale_names:
                self.scales[name] = encoded[name] = tensor.to(torch.float32)
                continue
            if name not in self.pending:
                encoded[name] = tensor
                continue
            self.pending.discard(name)
            self.shapes[prefix] = tuple(tensor.shape)
            if tensor.dtype not in ((FP8,) if self.quantized else tuple(KERNEL_DTYPES.values())):
                self.bad_dtype.append(f"{prefix} ({str(tensor.dtype).removeprefix('torch.')})")
                continue
            if tensor.shape[1] % 4 or _groups_over_24(tensor):
                self.not_24.append(prefix)
                continue
            self.zeros += int((tensor == 0).sum())
            self.total += tensor.numel()
            encoded.update({f"{prefix}.{part}": value for part, value in encode_24_bitmask(tensor).items()})
        return encoded

    def _scale_problems(self) -> list[str]:
        """Missing scales, and static input scales that differ inside a layer vLLM fuses: it keeps one."""
        missing = [f"{target}.{scale}" for target in sorted(self.targets) for scale in self.scale_names
                   if f"{target}.{scale}" not in self.scales]
        problems = [f"quantization parameters missing from the checkpoint: {_first(missing)}"] if missing else []
        fused_inputs: dict[str, list[torch.Tensor]] = {}
        for name, scale in self.scales.items():
            if name.endswith(".input_scale"):
                fused_inputs.setdefault(_fused_layer_name(name.rpartition(".")[0]), []).append(scale)
        problems += [f"{fused}: its parts have different static input scales; vLLM 0.18.1 loads one per fused layer"
                     for fused, scales in fused_inputs.items() if any(not torch.equal(s, scales[0]) for s in scales)]
        return problems

    def raise_if_refused(self) -> None:
        problems = []
        if self.pending:
            problems.append(f"decoder Linear weights missing from the checkpoint: {_first(sorted(self.pending))}")
        if self.bad_dtype and self.quantized:
            problems.append(
                "the checkpoint is FP8-quantized, so vLLM 0.18.1 runs every decoder Linear as FP8 2:4; quantize all "
                f"of them (targets: Linear, ignore: lm_head). Not float8_e4m3fn: {_first(self.bad_dtype)}"
            )
        elif self.bad_dtype:
            problems.append(
                "vLLM 0.18.1's 2:4 kernels take float16/bfloat16 weights only; cast with dtype='bfloat16' "
                f"(CLI: --dtype bfloat16). Offending: {_first(self.bad_dtype)}"
            )
        if self.not_24:
            problems.append(
                "vLLM 0.18.1 runs EVERY decoder Linear through the 2:4 kernel (it ignores sparsity `ignore` "
                "lists), so every one must be exactly 2:4 along its input dim; prune all of them "
                "(targets: Linear, ignore: re:.*lm_head) and quantize after pruning without GPTQModifier "
                "(in llm-compressor 0.14 it fills the pruned zeros), or export 'plain'. "
                f"Not 2:4: {_first(self.not_24)}"
            )
        if self.quantized:
            problems += self._scale_problems()
        problems += _kernel_constraint_problems(self.shapes)
        if problems:
            raise ExportError("cannot export vllm-2of4:\n  - " + "\n  - ".join(problems))

    @property
    def global_sparsity(self) -> float:
        return self.zeros / max(self.total, 1)


# --------------------------------------------------------------------------- export


def _validate_arguments(in_dir: Path, format: str, dtype: str | None) -> None:
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if dtype is not None and dtype not in KERNEL_DTYPES and dtype != "float32":
        raise ExportError(f"unsupported dtype {dtype!r}; choose bfloat16, float16 or float32")
    if format == "vllm-2of4" and dtype == "float32":
        raise ExportError("vllm-2of4 needs float16 or bfloat16 weights (vLLM 0.18.1's 2:4 kernels)")
    if not in_dir.is_dir():
        raise ExportError(f"input checkpoint folder {in_dir} does not exist")
    if not (in_dir / "config.json").is_file():
        raise ExportError(f"{in_dir} has no config.json; is it a Hugging Face checkpoint folder?")


def _check_output_dtype(config: dict, dtype: str | None) -> None:
    """The FP8 2:4 GEMM returns the model's dtype, which it allows only as float16/bfloat16 (sparse-only
    checkpoints are covered by the weight dtype check)."""
    name = dtype or config.get("dtype") or config.get("torch_dtype")
    if name not in KERNEL_DTYPES:
        raise ExportError(
            f"vllm-2of4: vLLM 0.18.1's FP8 2:4 kernel outputs float16/bfloat16 only and this model's dtype is {name}; "
            "pass dtype='bfloat16' (CLI: --dtype bfloat16)"
        )


def _cast(tensors: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """Cast the model's floating tensors to ``dtype``; quantized weights and their parameters keep theirs."""
    if dtype is None:
        return tensors
    target = KERNEL_DTYPES.get(dtype, torch.float32)

    def castable(name: str, tensor: torch.Tensor) -> bool:
        return tensor.is_floating_point() and tensor.dtype != FP8 and not name.endswith(QUANTIZATION_PARAM_SUFFIXES)

    return {name: t.to(target) if castable(name, t) else t for name, t in tensors.items()}


def _write_weights(in_dir: Path, staging: Path, format: str, dtype: str | None, quantization: dict | None) -> float | None:
    """Write every shard into ``staging``; return the global sparsity for vllm-2of4, else None."""
    encoder = _TwoFourEncoder(_decoder_linear_names(in_dir), quantization) if format == "vllm-2of4" else None
    weight_map: dict[str, str] = {}
    for shard_name, tensors in read_dense_weights(in_dir):
        tensors = _cast(tensors, dtype)
        if encoder is not None:
            tensors = encoder.encode_shard(tensors)
        save_file(tensors, staging / shard_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard_name))
        logger.debug("exported {} ({} tensors)", shard_name, len(tensors))
    # Always an index: with none, vLLM loads every *.safetensors in the folder, permutations.safetensors
    # too, and fails on its tensor names; with one it reads only the files the index names.
    index = json.loads((in_dir / WEIGHT_INDEX_FILE).read_text()) if (in_dir / WEIGHT_INDEX_FILE).is_file() else {}
    index.setdefault("metadata", {}).pop("total_size", None)  # sizes change with the layout and dtype
    index["weight_map"] = dict(sorted(weight_map.items()))
    (staging / WEIGHT_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if encoder is None:
        return None
    encoder.raise_if_refused()
    return encoder.global_sparsity


def _write_tokenizer_config(source: Path, target: Path) -> None:
    """transformers 5 names its generic fast tokenizer ``TokenizersBackend``; 4.x knows it as
    ``PreTrainedTokenizerFast`` (5.x reads that name back to the same class)."""
    tokenizer_config = json.loads(source.read_text())
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    target.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _copy_side_files(in_dir: Path, staging: Path) -> None:
    """Tokenizer, generation config, recipe.yaml, chat templates...: everything but weights and config."""
    weights = {path.name for path in _weight_files(in_dir)} | {WEIGHT_INDEX_FILE, "config.json"}
    for path in sorted(in_dir.iterdir()):
        if path.name in weights:
            continue
        if path.name == "tokenizer_config.json":
            _write_tokenizer_config(path, staging / path.name)
        elif path.is_dir():
            shutil.copytree(path, staging / path.name)
        elif path.suffix in {".bin", ".pt", ".pth"}:
            logger.warning("not copying {}: only safetensors weights are exported", path.name)
        else:
            shutil.copy2(path, staging / path.name)


def _read_config(in_dir: Path) -> dict:
    return json.loads((in_dir / "config.json").read_text())


def _exported_config(config: dict, format: str, dtype: str | None, global_sparsity: float | None,
                     quantization: dict | None) -> dict:
    if dtype is not None:
        config = dict(config, dtype=dtype)
        config.pop("torch_dtype", None)
    if format == "vllm-2of4":
        config = _vllm_2of4_config(config, global_sparsity, quantization)
    else:
        config = _plain_config(config)
    return _with_transformers4_keys(config)


def _export(in_dir: Path, out_dir: Path, format: str, dtype: str | None) -> Path:
    config = _read_config(in_dir)
    quantization = _served_quantization(config) if format == "vllm-2of4" else None
    if quantization is not None:
        _check_output_dtype(config, dtype)
    with staged_output(out_dir) as staging:
        global_sparsity = _write_weights(in_dir, staging, format, dtype, quantization)
        exported = _exported_config(config, format, dtype, global_sparsity, quantization)
        _copy_side_files(in_dir, staging)
        (staging / "config.json").write_text(json.dumps(exported, indent=2, sort_keys=True) + "\n")
    logger.info("exported {} as {} to {}", in_dir, format, out_dir)
    return out_dir


def export_checkpoint(
    in_dir: str | Path,
    out_dir: str | Path,
    format: str = "plain",
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the Hugging Face checkpoint in ``in_dir`` to ``out_dir`` in ``format`` (see the module doc).

    ``dtype`` ("bfloat16", "float16", "float32") casts every floating tensor but FP8 weights and
    quantization parameters; vllm-2of4 requires the result to be float16/bfloat16. Raises
    :class:`ExportError` with the reason and the fix; on any error nothing is left at ``out_dir``
    (an existing one is replaced only when the export succeeds).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _validate_arguments(in_dir, format, dtype)
    if out_dir.resolve() == in_dir.resolve():
        raise ExportError("the output folder must differ from the input folder (export_in_place rewrites a folder)")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; remove it or pass overwrite=True (CLI: --overwrite)")
    return _export(in_dir, out_dir, format, dtype)


def export_in_place(checkpoint_dir: str | Path, format: str = "vllm-2of4", *, dtype: str | None = None) -> Path:
    """Rewrite a saved checkpoint folder in ``format``, e.g. the ``output_dir`` of llm-compressor's
    ``oneshot``, so that the folder users get loads in the target runtime with no second copy.

    The new folder is built beside it and swapped in only on success: a refused export (ExportError)
    leaves the folder exactly as it was.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _validate_arguments(checkpoint_dir, format, dtype)
    return _export(checkpoint_dir, checkpoint_dir, format, dtype)
