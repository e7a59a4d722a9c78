"""Benchmark the permutation solvers on real and synthetic layers.

Real layers: down_proj (site "mlp") and o_proj (within-head blocks, site "attn_vo") of the bundled
stories260K model, with Hessians ``X^T X`` collected by forward hooks on text sampled from the model.
Synthetic layers: shaped like a 7B model's down_proj (4096 x 11008) and o_proj (4096 x 4096, head_dim
128), with heavy-tailed channel scales and a low-rank-plus-diagonal Hessian (correlated inputs).

Prints one table per layer class (reconstruction error relative to identity, wall and CPU time, both
as ratios to greedy), writes ``results/solvers/solvers.md`` and ``results/solvers/solvers.png``.
Every solver runs once per layer at its default settings (one repeat: the full-size synthetic layers
take minutes per solver on 2 CPU cores). The peak extra memory (RSS above the level before the
call, sampled every 0.1 s) is recorded for the synthetic layers.

    PYTHONPATH=src python benchmarks/solvers.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
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
    peak_mib: list[float] = field(default_factory=list)


def real_layers(samples: int, seq_len: int, seed: int) -> dict[str, list[LayerCase]]:
    """down_proj and o_proj of stories260K with full Hessians from model-sampled text."""
    from transformers import AutoModelForCausalLM

    from learned_permutation.tools.data import sample_token_ids

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


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak resident memory above the level at entry, sampled by a background thread (Linux)."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())

    @property
    def extra_mib(self) -> float:
        return self.peak - self.base


def run_case(case: LayerCase, score_kind: str, seed: int) -> dict[str, tuple[float, float, float, float]]:
    results = {}
    for method in METHODS:
        knobs = {} if method == "identity" else {"seed": seed}
        with PeakMemory() as memory:
            wall, cpu = time.perf_counter(), time.process_time()
            perm = solve_permutation(case.consumers, 2, 4, score_kind, method, block_size=case.block_size, **knobs)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        error = reconstruction_error(case.consumers, perm, 2, 4, score_kind, case.block_size)
        results[method] = (error, wall, cpu, memory.extra_mib)
        print(
            f"  {case.name:22s} {method:9s} error {error:.5f}  wall {wall:8.2f}s  cpu {cpu:8.2f}s  "
            f"peak +{memory.extra_mib:.0f} MiB",
            flush=True,
        )
    return results


def table(title: str, rows: dict[str, Row], memory: bool) -> str:
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    identity, greedy = rows["identity"], rows["greedy"]
    relative = {method: mean([e / i for e, i in zip(row.errors, identity.errors)]) for method, row in rows.items()}
    extra = " peak extra MiB |" if memory else ""
    lines = [
        f"### {title}",
        "",
        f"| solver | mean error | error / identity | error / greedy | wall s (mean) | wall / greedy | CPU s (mean) |{extra}",
        "|---|---|---|---|---|---|---|" + ("---|" if memory else ""),
    ]
    for method, row in rows.items():
        lines.append(
            f"| {method} | {mean(row.errors):.5f} | {relative[method]:.3f} | "
            f"{mean([e / g for e, g in zip(row.errors, greedy.errors)]):.3f} | {mean(row.wall):.2f} | "
            f"{mean(row.wall) / max(mean(greedy.wall), 1e-9):.2f} | {mean(row.cpu):.2f} |"
            + (f" {max(row.peak_mib):.0f} |" if memory else "")
        )
    return "\n".join(lines) + "\n"


def verdict(summary: dict[str, dict[str, Row]]) -> str:
    """Whether learned beats ria and greedy on mean reconstruction error, per real layer class."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    lines = ["## Does `learned` beat `ria` and `greedy` on the real layers?", ""]
    for title, rows in summary.items():
        if not title.startswith("stories260K"):
            continue
        learned = rows["learned"].errors
        parts = []
        for baseline in ("ria", "greedy"):
            other = rows[baseline].errors
            wins = sum(a < b for a, b in zip(learned, other))
            parts.append(
                f"{'beats' if mean(learned) < mean(other) else 'does NOT beat'} `{baseline}` "
                f"({mean(learned):.5f} vs {mean(other):.5f}, {mean(learned) / mean(other) - 1:+.1%}; "
                f"lower on {wins}/{len(learned)} layers)"
            )
        lines.append(f"- {title}: `learned` " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


ABLATIONS = {"learning only (polish=False)": {"polish": False}, "polish only (steps=0)": {"steps": 0}}


def ablation(cases: dict[str, list[LayerCase]], summary: dict[str, dict[str, Row]], score_kind: str, seed: int) -> str:
    """Which stage of `learned` carries its gain: on the real layers, each stage alone (cheap there)."""
    lines = [
        "## Ablation of `learned` on the real layers (mean error)",
        "",
        "`learned` starts from whichever of identity / ria / greedy has the lowest error, then "
        "runs rounds of Sinkhorn learning followed by the exact-objective swap polish. Each stage alone:",
        "",
        "| layer class | greedy | learned (both stages) | " + " | ".join(ABLATIONS) + " |",
        "|---|---|---|" + "---|" * len(ABLATIONS),
    ]
    for title, layer_cases in cases.items():
        if not title.startswith("stories260K"):
            continue
        rows = summary[title]
        means = [f"{sum(rows[method].errors) / len(rows[method].errors):.5f}" for method in ("greedy", "learned")]
        for knobs in ABLATIONS.values():
            errors = [
                reconstruction_error(
                    case.consumers,
                    solve_permutation(case.consumers, 2, 4, score_kind, "learned", block_size=case.block_size, seed=seed, **knobs),
                    2,
                    4,
                    score_kind,
                    case.block_size,
                )
                for case in layer_cases
            ]
            means.append(f"{sum(errors) / len(errors):.5f}")
        lines.append(f"| {title} | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def machine(threads: int) -> str:
    cores = os.cpu_count()
    return (
        f"Machine: {' '.join(filter(None, (platform.machine(), platform.processor())))} with {cores} CPU cores "
        "shared with other jobs, "
        f"no GPU; torch {torch.__version__} ({threads} intra-op threads requested; the solvers run their small ops "
        f"on one thread and their large `dW @ H` products on {threads}, see `learned_permutation.math.threads`), "
        f"Python {platform.python_version()}. The cores are shared, so wall times are noisy (other jobs can "
        f"take a core at any moment); each solver ran once per layer, so compare times only roughly.\n"
    )


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
    report = [
        f"# Solver benchmark (2:4, score `{args.score}`, seed {args.seed}, {args.threads} threads"
        f"{', quick' if args.quick else ''})\n",
        machine(args.threads),
        "All solvers at their default settings. Error = output reconstruction error "
        "`tr(dW H dW^T) / tr(W H W^T)` of the 2:4-pruned layer (lower is better); each real-layer row is the mean "
        "over the model's 5 layers.\n",
    ]
    headline = []
    for title, layer_cases in cases.items():
        print(f"{title}:", flush=True)
        rows = {method: Row() for method in METHODS}
        for case in layer_cases:
            for method, (error, wall, cpu, peak) in run_case(case, args.score, args.seed).items():
                rows[method].errors.append(error)
                rows[method].wall.append(wall)
                rows[method].cpu.append(cpu)
                rows[method].peak_mib.append(peak)
        summary[title] = rows
        synthetic = title.startswith("synthetic")
        text = table(title, rows, memory=synthetic)
        print(text, flush=True)
        report.append(text)
        if synthetic:
            learned = rows["learned"]
            line = (
                f"`learned` (default settings) on the {title}: {learned.wall[0]:.1f} s wall, "
                f"{learned.cpu[0]:.1f} s CPU, peak +{learned.peak_mib[0]:.0f} MiB resident"
            )
            headline.append(f"- {line}")
            print(line, flush=True)
    conclusion = verdict(summary)
    print(conclusion, flush=True)
    stages = ablation(cases, summary, args.score, args.seed)
    print(stages, flush=True)
    report.append(stages)
    report.insert(3, conclusion)
    if headline:
        report.insert(4, "## Time of `learned` on the synthetic layers\n\n" + "\n".join(headline) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"solvers{suffix}.md").write_text("\n".join(report))
    plot(summary, RESULTS / f"solvers{suffix}.png")
    print(f"wrote {RESULTS / f'solvers{suffix}.md'} and .png")


if __name__ == "__main__":
    main()
