"""Benchmark the permutation solvers on real and synthetic layers.

Real layers: down_proj (site "mlp") and o_proj (within-head blocks, site "attn_vo") of the bundled
stories260K model, with Hessians ``X^T X`` collected by forward hooks on text sampled from the model.
Synthetic layers: shaped like a 7B model's down_proj (4096 x 11008) and o_proj (4096 x 4096, head_dim
128), with heavy-tailed channel scales and a low-rank-plus-diagonal Hessian (correlated inputs).

Prints one table per layer class (reconstruction error relative to identity, wall and CPU time, both
as ratios to greedy), writes ``results/solvers/solvers.md`` and ``results/solvers/solvers.png``.

    PYTHONPATH=src python benchmarks/solvers.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from learned_permutation.math import Consumer, reconstruction_error, solve_permutation

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "src" / "learned_permutation" / "assets" / "stories260k"
RESULTS = ROOT / "results" / "solvers"
METHODS = ("identity", "ria", "greedy", "learned")


@dataclass
class LayerCase:
    name: str
    consumers: list[Consumer]
    block_size: int | None


@dataclass
class Row:
    errors: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def real_layers(samples: int, seq_len: int, seed: int) -> dict[str, list[LayerCase]]:
    """down_proj and o_proj of stories260K with full Hessians from model-sampled text."""
    from transformers import AutoModelForCausalLM

    from learned_permutation.integration.data import sample_token_ids

    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    tokens = sample_token_ids(model, model.config.bos_token_id, samples, seq_len, seed)
    hessians: dict[str, torch.Tensor] = {}

    def collect(name):
        def hook(_module, args):
            inputs = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + inputs.T @ inputs

        return hook

    modules = {}
    for index, layer in enumerate(model.model.layers):
        modules[f"layer{index}.down_proj"] = layer.mlp.down_proj
        modules[f"layer{index}.o_proj"] = layer.self_attn.o_proj
    handles = [module.register_forward_pre_hook(collect(name)) for name, module in modules.items()]
    with torch.no_grad():
        for batch in tokens.split(16):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    cases: dict[str, list[LayerCase]] = {"stories260K down_proj (64x172)": [], "stories260K o_proj (64x64, head blocks of 8)": []}
    for name, module in modules.items():
        consumer = Consumer(module.weight.detach().clone(), hessian=hessians[name].float())
        if name.endswith("down_proj"):
            cases["stories260K down_proj (64x172)"].append(LayerCase(name, [consumer], None))
        else:
            cases["stories260K o_proj (64x64, head blocks of 8)"].append(LayerCase(name, [consumer], model.config.head_dim))
    return cases


def synthetic_consumer(out: int, channels: int, seed: int, rank: int = 64) -> Consumer:
    """A layer with heavy-tailed input scales and correlated inputs: ``H = S (B B^T + diag(d)) S``."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(channels, generator=generator) * 1.0)  # log-normal: a few outlier channels
    basis = torch.randn(channels, rank, generator=generator) / rank**0.5
    hessian = basis @ basis.T + torch.diag(0.2 + torch.rand(channels, generator=generator))
    hessian = scales[:, None] * hessian * scales[None, :] * 1000.0
    weight = torch.randn(out, channels, generator=generator) / channels**0.5
    weight *= torch.exp(torch.randn(1, channels, generator=generator) * 0.3)  # per-column weight scales
    return Consumer(weight, hessian=hessian)


def synthetic_layers(quick: bool) -> dict[str, list[LayerCase]]:
    hidden, intermediate, head = (256, 688, 32) if quick else (4096, 11008, 128)
    return {
        f"synthetic down_proj ({hidden}x{intermediate})": [
            LayerCase("synthetic down_proj", [synthetic_consumer(hidden, intermediate, seed=1)], None)
        ],
        f"synthetic o_proj ({hidden}x{hidden}, head blocks of {head})": [
            LayerCase("synthetic o_proj", [synthetic_consumer(hidden, hidden, seed=2)], head)
        ],
    }


def run_case(case: LayerCase, score_kind: str, seed: int) -> dict[str, tuple[float, float, float]]:
    results = {}
    for method in METHODS:
        wall, cpu = time.perf_counter(), time.process_time()
        perm = solve_permutation(case.consumers, 2, 4, score_kind, method, block_size=case.block_size, seed=seed) if method != "identity" else solve_permutation(case.consumers, 2, 4, score_kind, method, block_size=case.block_size)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        results[method] = (reconstruction_error(case.consumers, perm, 2, 4, score_kind, case.block_size), wall, cpu)
        print(f"  {case.name:22s} {method:9s} error {results[method][0]:.5f}  wall {wall:8.2f}s  cpu {cpu:8.2f}s", flush=True)
    return results


def table(title: str, rows: dict[str, Row]) -> str:
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    identity, greedy = rows["identity"], rows["greedy"]
    relative = {method: mean([e / i for e, i in zip(row.errors, identity.errors)]) for method, row in rows.items()}
    lines = [
        f"### {title}",
        "",
        "| solver | mean error | error / identity | error / greedy | wall s (mean) | wall / greedy | CPU s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in rows.items():
        lines.append(
            f"| {method} | {mean(row.errors):.5f} | {relative[method]:.3f} | "
            f"{mean([e / g for e, g in zip(row.errors, greedy.errors)]):.3f} | {mean(row.wall):.2f} | "
            f"{mean(row.wall) / max(mean(greedy.wall), 1e-9):.2f} | {mean(row.cpu):.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Row]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(METHODS)
    for offset, method in enumerate(METHODS):
        values = [
            sum(e / i for e, i in zip(rows[method].errors, rows["identity"].errors)) / len(rows[method].errors)
            for rows in summary.values()
        ]
        axis.bar([k + offset * width for k in range(len(summary))], values, width, label=method)
    axis.set_xticks([k + 0.4 - width / 2 for k in range(len(summary))])
    axis.set_xticklabels([title.replace(" (", "\n(") for title in summary], fontsize=7)
    axis.set_ylabel("reconstruction error / identity (lower is better)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small synthetic layers and less calibration text")
    parser.add_argument("--score", default="wanda", help="pruning score the objective mirrors (default wanda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-synthetic", action="store_true", help="real layers only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = real_layers(samples=16 if args.quick else 64, seq_len=128, seed=args.seed)
    if not args.no_synthetic:
        cases.update(synthetic_layers(args.quick))
    summary: dict[str, dict[str, Row]] = {}
    report = [f"# Solver benchmark (2:4, score `{args.score}`, seed {args.seed}, {args.threads} threads)\n"]
    for title, layer_cases in cases.items():
        print(f"{title}:", flush=True)
        rows = {method: Row() for method in METHODS}
        for case in layer_cases:
            for method, (error, wall, cpu) in run_case(case, args.score, args.seed).items():
                rows[method].errors.append(error)
                rows[method].wall.append(wall)
                rows[method].cpu.append(cpu)
        summary[title] = rows
        text = table(title, rows)
        print(text, flush=True)
        report.append(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"solvers{suffix}.md").write_text("\n".join(report))
    plot(summary, RESULTS / f"solvers{suffix}.png")
    print(f"wrote {RESULTS / f'solvers{suffix}.md'} and .png")


if __name__ == "__main__":
    main()
