"""Time `fold_permutation` (one site at a time) over every site of a Llama-2-7B-shaped model and extrapolate to 32 layers.

A full 32-layer model (13.5 GB in bf16) does not fit beside other work in the shared RAM, so the
model is built with fewer layers (default 2 and 4) and the total time is fitted as
`fixed + per_layer * layers`: the fixed part is the embedding and lm_head (residual site),
the per-layer part is that layer's residual tensors plus its attn_vo and mlp sites.

    python benchmarks/folding_speed.py --layers 2 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learned_permutation.structure import find_sites, fold_permutation

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    tie_word_embeddings=False,
)


def build_model(layers: int, dtype: torch.dtype, kv_heads: int) -> torch.nn.Module:
    """Random weights without transformers' slow initialisation: allocate on meta, then fill."""
    config = LlamaConfig(**{**LLAMA2_7B, "num_key_value_heads": kv_heads}, num_hidden_layers=layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-1, 1)
    return model.eval()


def time_folding(model: torch.nn.Module, m: int, repeats: int) -> dict[str, float]:
    """Median seconds to fold one random permutation at all sites of each kind."""
    sites = find_sites(model, m)
    generator = torch.Generator().manual_seed(0)
    seconds: dict[str, list[float]] = {"residual": [], "attn_vo": [], "mlp": []}
    for _ in range(repeats):
        per_kind = dict.fromkeys(seconds, 0.0)
        for site in sites:
            block = site.block_size or site.size
            perm = (torch.argsort(torch.rand(site.size // block, block, generator=generator), dim=1)
                    + torch.arange(0, site.size, block)[:, None]).flatten()
            start = time.perf_counter()
            fold_permutation(model, site, perm)
            per_kind[site.kind] += time.perf_counter() - start
        for kind, value in per_kind.items():
            seconds[kind].append(value)
    return {kind: statistics.median(values) for kind, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs=2, default=(2, 4), help="two layer counts to fit the line")
    parser.add_argument("--target-layers", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--kv-heads", type=int, default=32, help="32 = Llama-2-7B (MHA); 8 = Llama-3-8B-style GQA")
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    measured = {}
    for layers in args.layers:
        model = build_model(layers, dtype, args.kv_heads)
        measured[layers] = time_folding(model, args.m, args.repeats)
        total = sum(measured[layers].values())
        print(f"{layers} layers ({args.dtype}, {torch.get_num_threads()} threads): "
              + ", ".join(f"{kind} {s:.3f} s" for kind, s in measured[layers].items()) + f"; all sites {total:.3f} s")
        del model

    small, large = args.layers
    totals = {layers: sum(times.values()) for layers, times in measured.items()}
    per_layer = (totals[large] - totals[small]) / (large - small)
    fixed = totals[small] - per_layer * small
    print(f"fit: {fixed:.3f} s fixed (embedding, lm_head) + {per_layer:.3f} s per layer")
    print(f"extrapolated to {args.target_layers} layers: {fixed + per_layer * args.target_layers:.2f} s for all "
          f"{1 + 2 * args.target_layers} sites")


if __name__ == "__main__":
    main()
