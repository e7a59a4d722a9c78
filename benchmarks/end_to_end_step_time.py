"""Seconds per step of ``objective: model`` on a model directory: the cost estimate in the README.

Random token ids stand in for calibration text (a step's cost does not depend on the tokens); the model
is simulated pruned with Wanda 2:4 and the residual site (or ``--sites``) is trained for ``--steps`` steps
of ``--batch-tokens`` tokens, after one untimed warm-up step.

    python benchmarks/end_to_end_step_time.py ~/.cache/learned-permutation/smollm2-135m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import load_model  # noqa: E402

from learned_permutation.plugin.end_to_end import EndToEndArgs, EndToEndLearning, split_sample  # noqa: E402
from learned_permutation.plugin.pruner_model import PrunerModel  # noqa: E402
from learned_permutation.plugin.selection import calibration_sample  # noqa: E402
from learned_permutation.plugin.statistics import InputStatistics  # noqa: E402
from learned_permutation.structure import find_sites  # noqa: E402


def pruned_linears_and_energy(model, batch: dict) -> tuple[list, dict]:
    """Every Linear but the head (what Wanda prunes here) and its input energy on ``batch``."""
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    energy = InputStatistics(full=False)
    handles = [module.register_forward_hook(energy.hook) for module in linears]
    with torch.no_grad():
        model.model(**batch)
    for handle in handles:
        handle.remove()
    return linears, energy.sums


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--sites", nargs="+", default=["residual"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir).to(args.device)
    width = 256
    rows = -(-2 * args.batch_tokens // width)
    ids = torch.randint(3, model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(0))
    sample = {key: value.to(args.device) for key, value in calibration_sample([{"input_ids": ids}], rows * width).items()}
    linears, act_sq = pruned_linears_and_energy(model, sample)
    settings = EndToEndArgs(sites=args.sites, steps=args.steps + 1, train_tokens=args.batch_tokens,
                            batch_tokens=args.batch_tokens, held_out_tokens=args.batch_tokens, checks=1)
    train, held_out = split_sample(sample, args.batch_tokens, args.batch_tokens)
    sites = find_sites(model, 4, kinds=tuple(args.sites))
    learning = EndToEndLearning(model, sites, linears, act_sq, PrunerModel("wanda", 2, 4), settings, args.device)
    stamps = []
    learn = learning._gradient_steps(train[:1], [learning._dense_targets(train[0])])
    for _ in learn:
        stamps.append(time.perf_counter())
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    parameters = sum(p.numel() for p in model.parameters()) / 1e9
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{args.threads} CPU threads"
    print(f"{args.model_dir.name}: {per_step:.2f} s per step of {int(train[0]['attention_mask'].sum())} tokens "
          f"({where}, sites {args.sites}, {parameters:.3f} B parameters); "
          f"{per_step / parameters:.1f} s per step per billion parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
