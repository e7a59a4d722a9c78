"""Make the checkpoints the isolated verifiers read (runs in the project environment).

A tiny Llama (dims multiples of 128, GQA, RoPE theta 500000) is pruned 2:4 by llm-compressor's
own WandaPruningModifier through oneshot, saved bf16 the way llm-compressor 0.14 saves it, then
exported by our exporter as ``plain`` and ``vllm-2of4``. ``reference.pt`` keeps a text, its token ids
and the dense checkpoint's logits, computed by transformers 5, for the other stacks to compare against.

The same model also goes through the project's FP8 recipes (permutation, 2:4 pruning, then
llm-compressor's QuantizationModifier): ``fp8-dynamic`` (recipes/wanda_2of4_fp8_dynamic_permuted.yaml)
and ``fp8-static`` (recipes/sparsegpt_2of4_fp8_static_permuted.yaml), saved as llm-compressor saves
them, each exported as ``<name>-2of4``.

Usage: python verify/make_checkpoints.py WORK_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FP8_RECIPES = {"fp8-dynamic": "wanda_2of4_fp8_dynamic_permuted.yaml", "fp8-static": "sparsegpt_2of4_fp8_static_permuted.yaml"}
RECIPE = """
sparsity_stage:
  sparsity_modifiers:
    WandaPruningModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["Linear"]
      ignore: ["re:.*lm_head"]
"""


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0", eos_token="w1")


def save_dense_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=None, eos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # dead inputs: groups with 0 and 1 non-zeros test how ties are stored
        model.model.layers[0].mlp.down_proj.weight[:, :4] = 0
        model.model.layers[0].mlp.down_proj.weight[:, 5:8] = 0
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)


def calibration_texts(count: int = 16, words: int = 48) -> "datasets.Dataset":
    import datasets

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (count, words), generator=generator)
    return datasets.Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row.tolist()) for row in ids]})


def main(work: Path) -> None:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import learned_permutation  # noqa: F401  (registers LearnedPermutationModifier for the FP8 recipes)
    from learned_permutation.tools.export import export_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    save_dense_model(work / "initial")
    for name, recipe in {"pruned": RECIPE, **{key: str(RECIPES / file) for key, file in FP8_RECIPES.items()}}.items():
        oneshot(
            model=str(work / "initial"), dataset=calibration_texts(), recipe=recipe, output_dir=str(work / name),
            num_calibration_samples=16, max_seq_length=48, precision="bfloat16", shuffle_calibration_samples=False,
        )
    export_checkpoint(work / "pruned", work / "plain", "plain", overwrite=True)
    export_checkpoint(work / "pruned", work / "vllm-2of4", "vllm-2of4", overwrite=True)
    for name in FP8_RECIPES:
        export_checkpoint(work / name, work / f"{name}-2of4", "vllm-2of4", overwrite=True)

    from transformers import AutoTokenizer

    text = " ".join(f"w{i}" for i in range(3, VOCAB, 11))
    token_ids = AutoTokenizer.from_pretrained(work / "pruned")(text, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(work / "pruned", dtype=torch.float32).eval()
    with torch.no_grad():
        reference = {"text": text, "token_ids": token_ids, "logits": model(token_ids).logits}
    torch.save(reference, work / "reference.pt")
    print(f"checkpoints in {work}: pruned, {', '.join(FP8_RECIPES)} (llm-compressor output), plain, vllm-2of4, "
          f"{', '.join(f'{name}-2of4' for name in FP8_RECIPES)}, reference.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
