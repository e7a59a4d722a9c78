"""FP8 W8A8 + 2:4: the recipes keep the checkpoint exactly 2:4, the vllm-2of4 export stores it as
compressed-tensors 0.14.0.1 would for vLLM 0.18.1's FP8 2:4 scheme, and refuses what that scheme
cannot serve. `verify/` checks the same exports with compressed-tensors 0.14.0.1 and vLLM 0.18.1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_export import DECODER_LINEARS, leftovers, stored, tensors

from learned_permutation_cli import main
from learned_permutation.tools.export import ExportError, encode_24_bitmask, export_checkpoint, export_in_place

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FP8 = torch.float8_e4m3fn


def oneshot(model_dir: Path, recipe: str | Path, out: Path, *options: str) -> int:
    return main(["oneshot", str(model_dir), str(recipe), "model-samples", "--output-dir", str(out),
                 "--num-samples", "16", "--seq-len", "64", "--precision", "bfloat16", *options])


def linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for name, t in tensors(folder).items() if name.rsplit(".", 2)[-2] in DECODER_LINEARS and name.endswith(".weight")}


def max_non_zeros_per_group(weight: torch.Tensor) -> int:
    return int((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max())


def copy_of(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_dynamic(tiny_llama_dir, tmp_path_factory) -> Path:
    """Permutation, Wanda 2:4, FP8_DYNAMIC: the folder as llm-compressor saves it."""
    out = tmp_path_factory.mktemp("fp8") / "dynamic"
    assert oneshot(tiny_llama_dir, RECIPES / "wanda_2of4_fp8_dynamic_permuted.yaml", out) == 0
    return out


@pytest.fixture(scope="module")
def fp8_static_served(tiny_llama_dir, tmp_path_factory) -> Path:
    """Permutation, SparseGPT 2:4, static FP8, written by oneshot directly in the vllm-2of4 format."""
    out = tmp_path_factory.mktemp("fp8") / "static"
    assert oneshot(tiny_llama_dir, RECIPES / "sparsegpt_2of4_fp8_static_permuted.yaml", out, "--export", "vllm-2of4") == 0
    return out


def test_quantization_after_pruning_keeps_every_decoder_linear_exactly_2of4(fp8_dynamic):
    weights = linear_weights(fp8_dynamic)
    assert len(weights) == 14 and all(w.dtype == FP8 for w in weights.values())
    assert all(max_non_zeros_per_group(w) <= 2 for w in weights.values())
    config = json.loads((fp8_dynamic / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"] == {}  # llm-compressor 0.14 writes no 2:4 metadata: the export adds it


def test_oneshot_export_writes_the_fp8_2of4_checkpoint_in_one_step(fp8_static_served):
    config = json.loads((fp8_static_served / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert (group["weights"]["strategy"], group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("tensor", "tensor", False)
    assert config["format"] == "float-quantized" and config["version"] == "0.14.0.1"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4" and config["sparsity_config"]["format"] == "sparse-24-bitmask"
    layout = stored(fp8_static_served)
    prefix = "model.layers.1.mlp.down_proj"
    assert f"{prefix}.weight" not in layout and layout[f"{prefix}.compressed"].dtype == FP8
    assert layout[f"{prefix}.weight_scale"].dtype == layout[f"{prefix}.input_scale"].dtype == torch.float32
    assert all(max_non_zeros_per_group(w) <= 2 for w in linear_weights(fp8_static_served).values())
    # vLLM reads only the files the index names; the modifier's permutations stay beside them
    index = json.loads((fp8_static_served / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"model.safetensors"} and (fp8_static_served / "permutations.safetensors").is_file()


def test_fp8_export_decodes_to_llm_compressor_weights_with_float32_scales(fp8_dynamic, tmp_path):
    out = export_checkpoint(fp8_dynamic, tmp_path / "out", "vllm-2of4", dtype="bfloat16")
    original, decoded, layout = tensors(fp8_dynamic), tensors(out), stored(out)
    assert original.keys() == decoded.keys()
    for name, tensor in original.items():
        assert torch.equal(decoded[name].view(torch.int8) if tensor.dtype == FP8 else decoded[name].float(),
                           tensor.view(torch.int8) if tensor.dtype == FP8 else tensor.float()), name
    scale = layout["model.layers.0.self_attn.q_proj.weight_scale"]
    assert scale.dtype == torch.float32 and scale.shape == (original["model.layers.0.self_attn.q_proj.weight"].shape[0], 1)


def test_fp8_bitmask_ranks_like_compressed_tensors():
    """compressed-tensors ranks FP8 by the int8 view of its bytes: -0.0 (0x80) below +0.0."""
    weight = torch.tensor([[0.5, -0.0, 0.0, 0.0] * 8], dtype=torch.bfloat16).to(FP8)
    kept = encode_24_bitmask(weight)["bitmask"][0, 0].item()
    assert kept & 0b1111 == 0b0101  # the value and the first +0.0, not the -0.0 at column 1


def test_gptq_after_pruning_breaks_2of4_and_oneshot_says_why(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "gptq.yaml"
    pruning = (RECIPES / "sparsegpt_2of4.yaml").read_text()
    recipe.write_text(pruning + "quantization_stage:\n  quantization_modifiers:\n    GPTQModifier:\n"
                      "      scheme: FP8_DYNAMIC\n      targets: [Linear]\n      ignore: [lm_head]\n")
    out = tmp_path / "out"
    assert oneshot(tiny_llama_dir, recipe, out, "--export", "vllm-2of4") == 2
    err = capsys.readouterr().err
    assert "without GPTQModifier" in err and "holds the checkpoint as llm-compressor saved it" in err
    assert all(max_non_zeros_per_group(w) > 2 for w in linear_weights(out).values())  # GPTQ filled the zeros


def test_oneshot_refuses_a_float32_vllm_export_before_loading(tiny_llama_dir, tmp_path, capsys):
    config_only = tmp_path / "config_only"  # no weights: loading the model would fail with another error
    shutil.copytree(tiny_llama_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    assert main(["oneshot", str(config_only), str(RECIPES / "wanda_2of4_fp8_dynamic.yaml"), "model-samples",
                 "--output-dir", str(tmp_path / "out"), "--seq-len", "64", "--export", "vllm-2of4"]) == 2
    assert "--precision bfloat16" in capsys.readouterr().err and not (tmp_path / "out").exists()


def weight_only(config):
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None


def int8(config):
    for role in ("weights", "input_activations"):
        config["quantization_config"]["config_groups"]["group_0"][role]["type"] = "int"


def grouped(config):
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=64)


@pytest.mark.parametrize(("edit", "reason"), [
    (weight_only, "weight-only"),
    (int8, "8-bit int"),
    (grouped, "strategy 'group'"),
])
def test_fp8_export_refuses_schemes_vllm_0_18_does_not_serve_with_2of4(fp8_dynamic, tmp_path, edit, reason):
    source = copy_of(fp8_dynamic, tmp_path / "source")
    edit_config(source, edit)
    with pytest.raises(ExportError, match=reason):
        export_checkpoint(source, tmp_path / "out", "vllm-2of4")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_fp8_export_refuses_an_unquantized_decoder_linear_and_a_float32_model(fp8_dynamic, tmp_path):
    source = copy_of(fp8_dynamic, tmp_path / "source")
    state = tensors(source)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"Not float8_e4m3fn: model\.layers\.0\.mlp\.up_proj"):
        export_checkpoint(source, tmp_path / "out", "vllm-2of4")
    float32 = copy_of(fp8_dynamic, tmp_path / "float32")
    edit_config(float32, lambda config: config.update(dtype="float32"))
    with pytest.raises(ExportError, match="outputs float16/bfloat16 only"):
        export_checkpoint(float32, tmp_path / "out", "vllm-2of4")
    assert json.loads((export_checkpoint(float32, tmp_path / "out", "vllm-2of4", dtype="bfloat16") / "config.json").read_text())["dtype"] == "bfloat16"


def test_fused_parts_with_different_static_input_scales_are_refused(fp8_static_served, tmp_path):
    source = copy_of(fp8_static_served, tmp_path / "source")
    state = stored(source)
    state["model.layers.0.self_attn.k_proj.input_scale"] = state["model.layers.0.self_attn.k_proj.input_scale"] * 2
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.qkv_proj: its parts have different static input scales"):
        export_checkpoint(source, tmp_path / "out", "vllm-2of4")


def test_export_in_place_rewrites_the_folder_only_on_success(fp8_dynamic, tmp_path):
    folder = copy_of(fp8_dynamic, tmp_path / "pruned")
    edit_config(folder, weight_only)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(ExportError, match="weight-only"):
        export_in_place(folder, "vllm-2of4")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before and leftovers(tmp_path) == []
    folder = copy_of(fp8_dynamic, tmp_path / "served")
    export_in_place(folder, "vllm-2of4")
    assert "model.layers.0.mlp.up_proj.bitmask" in stored(folder) and leftovers(tmp_path) == []
