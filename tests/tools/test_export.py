"""Export formats: plain reloads unchanged, vllm-2of4 decodes to the same weights, bad input leaves nothing.

The layout is checked here against numpy's packbits and our own reader; `verify/` checks it against
compressed-tensors 0.14.0.1 and vLLM 0.18.1 themselves in isolated environments.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from learned_permutation_cli import main
from learned_permutation.tools.export import (
    ExportError,
    decode_24_bitmask,
    encode_24_bitmask,
    export_checkpoint,
    read_dense_weights,
)

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPE = 'sparsity_stage:\n  sparsity_modifiers:\n    WandaPruningModifier:\n      mask_structure: "2:4"\n'


def prune_24(weight: torch.Tensor) -> None:
    """Zero the 2 smallest |w| of every 4 consecutive input columns, in place."""
    groups = weight.view(weight.shape[0], -1, 4)
    groups.scatter_(-1, groups.abs().topk(2, dim=-1, largest=False).indices, 0)


def tiny_llama(intermediate_size: int = 256, rope_parameters: dict | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 500000.0},
    )
    return LlamaForCausalLM(config).eval()


def save_checkpoint(model: LlamaForCausalLM, path: Path, *, prune: bool = True, dtype=torch.bfloat16, **save_kwargs) -> Path:
    model = model.to(dtype)
    if prune:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
                    prune_24(module.weight)
    model.save_pretrained(path, **save_kwargs)
    vocab = {f"t{i}": i for i in range(256)}
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(path)
    (path / "recipe.yaml").write_text(RECIPE)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {name: t for _, shard in read_dense_weights(path) for name, t in shard.items()}


def stored(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            out.update({name: reader.get_tensor(name) for name in reader.keys()})
    return out


def logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(0, 256, 7).unsqueeze(0)).logits


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_llama(), tmp_path_factory.mktemp("ckpt") / "sparse")


@pytest.fixture(scope="module")
def vllm_dir(sparse_dir, tmp_path_factory) -> Path:
    return export_checkpoint(sparse_dir, tmp_path_factory.mktemp("out") / "vllm", "vllm-2of4")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------- codec


def random_24(rows: int, cols: int) -> torch.Tensor:
    torch.manual_seed(1)
    weight = torch.randn(rows, cols, dtype=torch.bfloat16)
    prune_24(weight)
    weight[0, :4] = 0  # a group with no non-zero
    weight[1, 4:8] = torch.tensor([0, 0, 3, 0])  # a group with one
    return weight


def test_bitmask_bits_follow_numpy_little_bitorder():
    weight = random_24(6, 12)  # 12 columns: the last bitmask byte is half padding
    parts = encode_24_bitmask(weight)
    kept = decode_24_bitmask(torch.ones_like(parts["compressed"]), parts["bitmask"], parts["shape"]) != 0
    expected = np.packbits(kept.numpy(), axis=-1, bitorder="little")
    assert parts["bitmask"].dtype == torch.uint8
    assert np.array_equal(parts["bitmask"].numpy(), expected)
    assert (kept.view(6, 3, 4).sum(-1) == 2).all()


def test_bitmask_stores_kept_values_row_major_and_decodes_exactly():
    weight = random_24(8, 64)
    parts = encode_24_bitmask(weight)
    assert parts["compressed"].shape == (8, 32) and parts["compressed"].dtype == torch.bfloat16
    assert parts["shape"].tolist() == [[8], [64]] and parts["shape"].dtype == torch.int64
    assert torch.equal(parts["compressed"][2][parts["compressed"][2] != 0], weight[2][weight[2] != 0])
    assert torch.equal(decode_24_bitmask(**parts), weight)


def test_encode_refuses_a_group_with_three_non_zeros():
    weight = random_24(4, 16)
    weight[3, 8:12] = 1.0
    with pytest.raises(ExportError, match="1 groups of 4 input columns hold more than 2 non-zeros"):
        encode_24_bitmask(weight)


# ----------------------------------------------------------------------------- vllm-2of4


def test_vllm_2of4_layout_replaces_every_decoder_linear_weight(sparse_dir, vllm_dir):
    layout = stored(vllm_dir)
    for layer in range(2):
        for linear in DECODER_LINEARS:
            prefix = f"model.layers.{layer}.{'self_attn' if linear.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{linear}"
            rows, cols = stored(sparse_dir)[f"{prefix}.weight"].shape
            assert f"{prefix}.weight" not in layout
            assert layout[f"{prefix}.compressed"].shape == (rows, cols // 2)
            assert layout[f"{prefix}.compressed"].dtype == torch.bfloat16
            assert layout[f"{prefix}.bitmask"].shape == (rows, cols // 8)
            assert layout[f"{prefix}.shape"].tolist() == [[rows], [cols]]
    assert "lm_head.weight" in layout and "model.embed_tokens.weight" in layout


def test_vllm_2of4_config_is_what_vllm_0_18_reads(vllm_dir):
    config = json.loads((vllm_dir / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["sparsity_config"] == {
        "format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"],
        "ignore": ["lm_head"], "global_sparsity": 0.5,
    }
    # transformers 4.57 needs the top-level theta (it ignores rope_parameters)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0


def test_vllm_2of4_decodes_to_the_dense_weights(sparse_dir, vllm_dir):
    dense, decoded = tensors(sparse_dir), tensors(vllm_dir)
    assert dense.keys() == decoded.keys()
    for name in dense:
        assert torch.equal(dense[name], decoded[name]), name


def test_sharded_checkpoint_keeps_its_index(tmp_path):
    source = save_checkpoint(tiny_llama(), tmp_path / "sharded", max_shard_size="100KB")
    out = export_checkpoint(source, tmp_path / "out", "vllm-2of4")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert index.keys() == stored(out).keys()
    assert "model.layers.1.mlp.down_proj.bitmask" in index
    assert tensors(out).keys() == tensors(source).keys()


def test_vllm_2of4_refuses_a_dense_decoder_linear(tmp_path):
    model = tiny_llama()
    source = save_checkpoint(model, tmp_path / "sparse")
    state = stored(source)
    state["model.layers.1.self_attn.o_proj.weight"] = torch.ones_like(state["model.layers.1.self_attn.o_proj.weight"])
    from safetensors.torch import save_file

    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"EVERY decoder Linear[\s\S]*model\.layers\.1\.self_attn\.o_proj"):
        export_checkpoint(source, tmp_path / "out", "vllm-2of4")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_vllm_2of4_refuses_float32_and_casts_on_request(tmp_path):
    source = save_checkpoint(tiny_llama(), tmp_path / "fp32", dtype=torch.float32)
    with pytest.raises(ExportError, match="float16/bfloat16 weights only; cast with dtype='bfloat16'"):
        export_checkpoint(source, tmp_path / "out", "vllm-2of4")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    out = export_checkpoint(source, tmp_path / "out", "vllm-2of4", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name, weight in tensors(source).items():
        assert torch.equal(tensors(out)[name], weight.to(torch.bfloat16)), name


def test_vllm_2of4_refuses_sizes_the_kernel_cannot_run(tmp_path):
    source = save_checkpoint(tiny_llama(intermediate_size=144), tmp_path / "odd")
    with pytest.raises(ExportError, match=r"mlp\.down_proj: input size 144 is not a multiple of 32"):
        export_checkpoint(source, tmp_path / "out", "vllm-2of4")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- plain


def test_plain_export_reloads_with_identical_logits_and_side_files(sparse_dir, vllm_dir, tmp_path):
    expected = logits(sparse_dir)
    for source in (sparse_dir, vllm_dir):  # from the dense checkpoint and back from the bitmask one
        out = export_checkpoint(source, tmp_path / source.name, "plain")
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config
        assert torch.equal(logits(out), expected)
        for side in ("recipe.yaml", "tokenizer.json", "generation_config.json"):
            assert (out / side).read_bytes() == (sparse_dir / side).read_bytes(), side


def test_tokenizer_class_is_one_transformers_4_knows_and_5_reads_the_same(sparse_dir, vllm_dir):
    assert json.loads((sparse_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert json.loads((vllm_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "t5 t17 t300 t9"
    exported, original = AutoTokenizer.from_pretrained(vllm_dir), AutoTokenizer.from_pretrained(sparse_dir)
    assert type(exported) is type(original)
    assert exported(text).input_ids == original(text).input_ids == [5, 17, 0, 9]


def test_plain_keeps_real_quantization_but_drops_sparsity_metadata(sparse_dir, tmp_path):
    source = tmp_path / "meta"
    source.mkdir()
    for path in sparse_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    groups = {"group_0": {"targets": ["Linear"]}}
    config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": groups,
                                     "sparsity_config": {"format": "dense", "targets": ["Linear"]}}
    (source / "config.json").write_text(json.dumps(config))
    out = json.loads((export_checkpoint(source, tmp_path / "out") / "config.json").read_text())
    assert out["quantization_config"] == {"quant_method": "compressed-tensors", "config_groups": groups}


def test_scaled_rope_is_written_for_transformers_4_and_reads_back_in_5(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    source = save_checkpoint(tiny_llama(rope_parameters=rope), tmp_path / "llama3")
    out = export_checkpoint(source, tmp_path / "out", "plain")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {key: value for key, value in rope.items() if key != "rope_theta"}
    assert AutoConfig.from_pretrained(out).rope_parameters == AutoConfig.from_pretrained(source).rope_parameters
    assert torch.equal(logits(out), logits(source))


# ----------------------------------------------------------------------------- bad input, CLI


def test_missing_input_and_unknown_format_fail_clearly(tmp_path, sparse_dir):
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ExportError, match="unknown export format 'marlin'"):
        export_checkpoint(sparse_dir, tmp_path / "out", "marlin")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(sparse_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(sparse_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(sparse_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_cli_exports_and_reports_refusals(sparse_dir, tmp_path, capsys):
    command = ["export", str(sparse_dir), str(tmp_path / "v"), "--format", "vllm-2of4"]
    assert main(command) == 0 and (tmp_path / "v" / "config.json").is_file()
    assert main(command) == 2
    assert capsys.readouterr().err.startswith("error: ")
