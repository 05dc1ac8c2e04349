"""Which distribution entropy-bound acceptance should read when a request has sampling filters: the filtered one (what
is sampled) or the unfiltered, temperature-scaled one (what the model believes). Measured on the ``tiny`` model's
held-out sorting problems in exact mode: exact-match accuracy, denoising steps per canvas and tokens per forward for
each filter setting under both choices.

    python bench/filter_entropy.py [--n 100]

dgserve uses ``sampling_filters.ACCEPTANCE_ENTROPY``; this script switches it for the measurement only.
"""

from __future__ import annotations

import argparse

import torch

from dgserve.engine import sampler
from dgserve.model.checkpoint import load
from dgserve.train.evaluate import sort_exact_match

SETTINGS = {"none": {}, "top_k 1": {"top_k": 1}, "top_k 5": {"top_k": 5}, "top_p 0.9": {"top_p": 0.9},
            "top_p 0.5": {"top_p": 0.5}, "min_p 0.1": {"min_p": 0.1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="held-out sorting problems")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load("tiny")
    base = loaded.generation.sampling
    print(f"tiny model, {args.n} held-out sorting problems (seed = index), one canvas each, exact mode, 1 thread\n")
    print("| filters | acceptance entropy | exact match | steps per canvas | tokens per forward |")
    print("| --- | --- | ---: | ---: | ---: |")
    default = sampler.ACCEPTANCE_ENTROPY
    try:
        for name, update in SETTINGS.items():
            for choice in ("unfiltered", "filtered"):
                if not update and choice == "filtered":
                    continue  # no filter: the two are the same distribution
                sampler.ACCEPTANCE_ENTROPY = choice
                acc, _, totals = sort_exact_match(loaded, base.model_copy(update=update), args.n)
                steps = totals["steps"] / totals["canvases"]
                print(f"| {name} | {choice} | {acc:.0%} | {steps:.2f} | {totals['tokens'] / totals['steps']:.2f} |")
    finally:
        sampler.ACCEPTANCE_ENTROPY = default


if __name__ == "__main__":
    main()
