"""Does the straight-through gradient of ``objective: model`` predict what a channel swap does to the loss?

On stories260K (calibration seed 0), after the default ``select`` permutations are folded (the start of
``objective: model``): the gradient of the end-to-end loss (CE + KL to dense, Wanda 2:4 simulated) with
respect to the residual site's soft permutation at the hard start, the first-order change it predicts
for ``--swaps`` random swaps of two residual channels in different groups, and the real change of the
loss on the same tokens. Prints the Spearman correlation of the two: near 1 means gradient steps on the
logits move towards better permutations, near 0 means they do not.

    python benchmarks/end_to_end_gradient_check.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_setup  # noqa: E402

from comparison import load_model  # noqa: E402
from end_to_end_step_time import pruned_linears_and_energy  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from learned_permutation import LearnedPermutationModifier  # noqa: E402
from learned_permutation.plugin.end_to_end import EndToEndArgs, EndToEndLearning  # noqa: E402
from learned_permutation.plugin.pruner_model import PrunerModel  # noqa: E402
from learned_permutation.plugin.selection import calibration_sample  # noqa: E402
from learned_permutation.structure import find_sites  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = build_setup(argparse.Namespace(model="embedded", num_samples=128, seq_len=256, held_out_samples=32,
                                           seed=0), 0)
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    model = oneshot(model=load_model(setup.model_dir), tokenizer=tokenizer, dataset=setup.calibration,
                    recipe=[LearnedPermutationModifier(mask_structure="2:4", score="wanda")],
                    num_calibration_samples=128, max_seq_length=256, shuffle_calibration_samples=False)
    rows = [tokenizer(text, truncation=True, max_length=256, return_tensors="pt") for text in setup.calibration["text"]]
    batch = calibration_sample([dict(row) for row in rows], args.tokens)
    linears, act_sq = pruned_linears_and_energy(model, batch)
    site = find_sites(model, 4, kinds=("residual",))[0]
    learning = EndToEndLearning(model, [site], linears, act_sq, PrunerModel("wanda", 2, 4),
                                EndToEndArgs(train_tokens=args.tokens, batch_tokens=args.tokens), "cpu")
    targets = learning._dense_targets(batch)
    identity = torch.arange(site.size)
    plan = torch.eye(site.size)[None].requires_grad_()
    with torch.enable_grad():
        learning._set_orders({site.name: (plan, identity)})
        with learning._simulation(checkpointed=True):
            learning._loss(batch, targets)["total"].backward()
    gradient = plan.grad[0]
    start = learning.loss(batch, targets, {site.name: identity})["total"]
    generator = torch.Generator().manual_seed(0)
    predicted, actual = [], []
    while len(predicted) < args.swaps:
        i, j = torch.randint(site.size, (2,), generator=generator).tolist()
        if i // 4 == j // 4:
            continue
        swapped = identity.clone()
        swapped[i], swapped[j] = j, i
        predicted.append(float(gradient[i, j] + gradient[j, i] - gradient[i, i] - gradient[j, j]))
        actual.append(learning.loss(batch, targets, {site.name: swapped})["total"] - start)
    rho = spearmanr(predicted, actual).statistic
    improving = sum(a < 0 for a in actual)
    print(f"Spearman(predicted, actual) over {args.swaps} swaps: {rho:.3f}; swaps predicted to help: "
          f"{sum(p < 0 for p in predicted)}; swaps that help: {improving}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
