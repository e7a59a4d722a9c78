"""Does a permutation's column order or its importance score change SparseGPT's error, one Linear at a time?

SparseGPT prunes columns left to right and lets every later column absorb the error (OBS update), so two
permutations with the same M-groups in another order give the same Wanda mask but not the same SparseGPT
weights. This probe takes three decoder layers of SmolLM2-135M, the dense inputs of their q/k/v/gate/up
(one site: they read one input) and of their down_proj on C4 calibration rows and on other (held-out) C4
rows, and prunes each weight with llm-compressor's own ``sparsify_weight`` (2:4, 128-column blocks, 1%
dampening) in the order of:

* ``identity``, ``ria`` and ``greedy`` on SparseGPT's saliency (what the modifier solves with SparseGPT);
* ``ria`` / ``greedy`` on the Wanda, RIA and magnitude scores (``@score``);
* ``ria``'s groups (and their members) sorted by input energy, descending (``ria, act order``: GPTQ's
  ``desc_act`` idea) or ascending, or by the saliency summed over the consumers;

and prints the relative output error ``||X (W - W_pruned)^T||^2 / ||X W^T||^2`` summed over the site's
weights, held out / calibration. The layer error is not the end-to-end measure (``docs/results.md``); it
shows whether an idea moves SparseGPT at all.

    python benchmarks/sparsegpt_layer_probe.py --layers 3 15 27 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import build  # noqa: E402

from learned_permutation.math import SiteProblem, solve_site  # noqa: E402
from learned_permutation.math.objectives import Consumer  # noqa: E402
from learned_permutation.tools.data import parquet_dataset, shared_data_dir  # noqa: E402

N, M, OBS_BLOCK, DAMPENING = 2, 4, 128, 0.01


def token_rows(tokenizer, texts, rows: int, length: int) -> torch.Tensor:
    """The first ``rows`` texts of at least ``length`` tokens, cut to ``length``."""
    found = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        if len(ids) >= length:
            found.append(ids[:length])
            if len(found) == rows:
                return torch.stack(found)
    raise SystemExit(f"fewer than {rows} texts of {length} tokens")


def site_inputs(model, layers: list[int], ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Dense inputs of each layer's q_proj (= k/v/gate/up's after their norms) and down_proj, [tokens, channels]."""
    found: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index in layers:
        layer = model.model.layers[index]
        for name, module in (("attention and mlp inputs", layer.self_attn.q_proj), ("down_proj input", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, key=(index, name): found.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for batch in ids.split(8):
            model(batch)
    for handle in handles:
        handle.remove()
    return {key: torch.cat(parts) for key, parts in found.items()}


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """llm-compressor's SparseGPT on ``weight``'s columns in ``order``, back in the stored order."""
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    stand_in = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    stand_in.weight = nn.Parameter(weight[:, order].clone(), requires_grad=False)
    _, pruned = sparsify_weight(stand_in, {stand_in: hessian[order][:, order].clone()}, N / M, N, M, OBS_BLOCK,
                                DAMPENING, False)
    return pruned[:, torch.argsort(order)]


def sorted_groups(perm: torch.Tensor, importance: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """``perm``'s M-groups unchanged, their members and then the groups sorted by ``importance``."""
    groups = perm.reshape(-1, M)
    groups = groups.gather(1, importance[groups].argsort(dim=1, descending=descending, stable=True))
    return groups[importance[groups].sum(dim=1).argsort(descending=descending, stable=True)].reshape(-1)


def orders(weights: list[torch.Tensor], hessian: torch.Tensor) -> dict[str, torch.Tensor]:
    def problem(kind: str) -> SiteProblem:
        return SiteProblem([Consumer(weight, hessian=hessian) for weight in weights], N, M, kind)

    saliency = problem("sparsegpt")
    found = {"identity": torch.arange(hessian.shape[0]), "ria": solve_site(saliency, "ria"),
             "greedy": solve_site(saliency, "greedy")}
    found["ria, act order"] = sorted_groups(found["ria"], hessian.diagonal())
    found["ria, ascending energy"] = sorted_groups(found["ria"], hessian.diagonal(), descending=False)
    found["ria, saliency order"] = sorted_groups(found["ria"], sum(c.score.sum(dim=0) for c in saliency.consumers))
    for kind in ("wanda", "ria", "magnitude"):
        other = problem(kind)
        found[f"ria@{kind}"], found[f"greedy@{kind}"] = solve_site(other, "ria"), solve_site(other, "greedy")
    return found


def relative_error(weights: list[torch.Tensor], pruned: list[torch.Tensor], inputs: torch.Tensor) -> float:
    lost = sum(float(((inputs @ (w - p).T) ** 2).sum()) for w, p in zip(weights, pruned))
    return lost / sum(float(((inputs @ w.T) ** 2).sum()) for w in weights)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument("--calibration-rows", type=int, default=32, help="C4 rows of 512 tokens for the Hessians")
    parser.add_argument("--held-out-rows", type=int, default=16, help="other C4 rows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = parquet_dataset(shared_data_dir() / "c4" / "c4_validation_2k.parquet")["text"]
    calibration = site_inputs(model, args.layers, token_rows(tokenizer, texts[:400], args.calibration_rows, 512))
    held_out = site_inputs(model, args.layers, token_rows(tokenizer, texts[-400:], args.held_out_rows, 512))
    print(f"`python benchmarks/sparsegpt_layer_probe.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("relative output error after SparseGPT 2:4, held out / calibration (lower is better)\n")
    rows: dict[str, list[str]] = {}
    heads = []
    for index in args.layers:
        layer = model.model.layers[index]
        for name, modules in (("attention and mlp inputs", [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                            layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj]),
                              ("down_proj input", [layer.mlp.down_proj])):
            inputs = calibration[index, name]
            hessian = inputs.T @ inputs
            weights = [module.weight.detach() for module in modules]
            heads.append(f"layer {index} {name}")
            for label, order in orders(weights, hessian).items():
                pruned = [sparsegpt(weight, hessian, order) for weight in weights]
                rows.setdefault(label, []).append(f"{relative_error(weights, pruned, held_out[index, name]):.5f} / "
                                                  f"{relative_error(weights, pruned, inputs):.5f}")
            print(f"(done: {heads[-1]})", file=sys.stderr, flush=True)
    print("| order | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
