"""A GGUF Llama checkpoint -> an ordinary float Hugging Face checkpoint that every tool here can load.

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package) and
de-quantizes it to float, but the model it returns still carries a GGUF ``quantization_config`` that
``save_pretrained`` and llm-compressor trip over. So the weights are moved into a model built from the
same config without it, and saved from there. The GGUF reader also undoes llama.cpp's interleaved
q/k row order, which is why nothing here touches the tensors.

Needs the optional ``gguf`` package (``pip install 'learned-permutation[bench]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from learned_permutation.tools.data import InputError

# keys of the GGUF-loaded config that describe the file it came from, not the model
_GGUF_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise InputError(
            "reading GGUF needs the gguf package: pip install 'learned-permutation[bench]' (or pip install gguf)"
        ) from error


def convert_gguf(gguf_file: str | Path, output_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantize ``gguf_file`` and save it, with its tokenizer, as a plain checkpoint in ``output_dir``.

    ``config.json`` also gets ``rope_theta`` at the top level (transformers 5 writes only
    ``rope_parameters``; transformers-4 readers would fall back to 10000).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from learned_permutation.tools.export import _with_transformers4_keys

    gguf_file, output_dir = Path(gguf_file).resolve(), Path(output_dir)
    if not gguf_file.is_file():
        raise InputError(f"GGUF file not found: {gguf_file}")
    _require_gguf()
    folder, name = gguf_file.parent, gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)

    clean = {key: value for key, value in config.to_dict().items() if key not in _GGUF_ONLY_KEYS}
    model = AutoModelForCausalLM.from_config(type(config).from_dict(clean), dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    config_path = output_dir / "config.json"
    config_path.write_text(json.dumps(_with_transformers4_keys(json.loads(config_path.read_text())), indent=2) + "\n")
    return output_dir


def greedy_continuation(model_dir: str | Path, prompt: str, max_new_tokens: int = 4) -> str:
    """The model's greedy continuation of ``prompt`` (the new text only): a smoke test of a conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
