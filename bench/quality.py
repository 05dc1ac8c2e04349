"""Speed/quality curve of a trained checkpoint, and the format cross-check against transformers.

    python bench/quality.py [--model tiny] [--n 100] [--hf] [--hf-all] [--modes] [--json] [--dtype D]
                            [--quantization fp8 --fp8-emulation]

Prints the held-out denoising loss, then for entropy bound x max steps (0.05/0.1/0.3 x 8/16/48) the
exact-match accuracy on held-out sorting problems, tokens/s, tokens per forward and steps per canvas
(dgserve's single-request loop, CPU fp32). ``--hf`` loads the same directory with transformers'
``DiffusionGemmaForBlockDiffusion``, generates the same prompts with the same seeds and settings
(the default setting; ``--hf-all``: every setting), and reports its accuracy and how many outputs are
token-for-token identical to dgserve's. ``--modes`` serves the sorting problems through the batching engine
in exact and in fast execution (the default setting) and reports both accuracies and their difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dgserve.engine.single import generate_single
from dgserve.model.checkpoint import LoadedModel, load
from dgserve.model.generation_config import SamplingParams
from dgserve.train.data import sort_answer, sort_eval_set, sort_prompt
from dgserve.train.evaluate import ENTROPY_BOUNDS, MAX_STEPS, heldout_loss, sort_exact_match_engine, sweep
from dgserve.train.paths import resolve_model


def hf_sort_check(loaded: LoadedModel, model_dir: str, sampling: SamplingParams, n: int) -> dict[str, float]:
    """transformers' accuracy on the same problems/seeds/settings, and agreement with dgserve."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    tok = loaded.tokenizer
    canvas = loaded.config.canvas_length
    eos = list(loaded.generation.eos_token_ids)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref.generation_config = DiffusionGemmaGenerationConfig(
        max_denoising_steps=sampling.max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=sampling.entropy_bound),
        t_min=sampling.t_min, t_max=sampling.t_max, stability_threshold=sampling.stability_threshold,
        confidence_threshold=sampling.confidence_threshold, eos_token_id=eos,
        pad_token_id=loaded.generation.pad_token_id, max_new_tokens=canvas)
    hf_hits = dg_hits = same = 0
    started = time.perf_counter()
    for i, digits in enumerate(sort_eval_set(n)):
        ids = tok.encode(sort_prompt(digits))
        torch.manual_seed(i)
        with torch.no_grad():
            seq = ref.generate(torch.tensor([ids]), max_new_tokens=canvas).sequences[0, len(ids):].tolist()
        stop = next((j for j, t in enumerate(seq) if t in eos), None)
        hf_ids = seq if stop is None else seq[:stop]
        dg = generate_single(loaded.model, ids, max_tokens=canvas, seed=i, sampling=sampling,
                             eos_token_ids=loaded.generation.eos_token_ids)
        expected = sort_answer(digits).strip()
        hf_hits += stop is not None and tok.decode(hf_ids).strip() == expected
        dg_hits += dg.finish_reason == "stop" and tok.decode(dg.token_ids).strip() == expected
        same += hf_ids == dg.token_ids
    return {"hf_exact_match": hf_hits / n, "dgserve_exact_match": dg_hits / n, "identical_outputs": same / n,
            "hf_seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--hf", action="store_true", help="cross-check the default setting with transformers")
    p.add_argument("--hf-all", action="store_true", help="cross-check every setting with transformers")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the dgserve sweep (with --hf)")
    p.add_argument("--modes", action="store_true", help="exact vs fast execution through the engine")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="(default float32)")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"],
                   help="fp8: FP8 weights (on CPU with --fp8-emulation); the transformers cross-check stays fp32")
    p.add_argument("--fp8-emulation", action="store_true", help="emulate the FP8 arithmetic (CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    loaded = load(model_dir, dtype=args.dtype, quantization=args.quantization, fp8_emulation=args.fp8_emulation)
    if not Path(model_dir).is_dir():
        print(f"{args.model}: bench/quality.py needs a trained checkpoint directory", file=sys.stderr)
        return 2
    report: dict = {"model": loaded.source, "heldout_loss": heldout_loss(loaded) if args.sweep else {}}
    results = sweep(loaded, n=args.n, entropy_bounds=ENTROPY_BOUNDS, max_steps=MAX_STEPS) if args.sweep else []
    report["settings"] = [r.as_dict() for r in results]
    default = loaded.generation.sampling
    if args.hf or args.hf_all:
        pairs = [(b, s) for b in ENTROPY_BOUNDS for s in MAX_STEPS] if args.hf_all \
            else [(default.entropy_bound, default.max_denoising_steps)]
        report["hf_cross_check"] = [
            {"entropy_bound": b, "max_steps": s,
             **hf_sort_check(loaded, model_dir, default.model_copy(update={"entropy_bound": b,
                                                                           "max_denoising_steps": s}), args.n)}
            for b, s in pairs]
    if args.modes:
        modes = {m: sort_exact_match_engine(loaded, default, args.n, m) for m in ("exact", "fast")}
        report["execution_modes"] = {**modes, "fast_minus_exact_points": round(100 * (modes["fast"] - modes["exact"]),
                                                                               1)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']}  (default sampler: entropy bound {default.entropy_bound}, "
          f"max steps {default.max_denoising_steps})")
    print("held-out denoising loss (nats/token): "
          + ", ".join(f"{k} {v}" for k, v in report["heldout_loss"].items()))
    print(f"{'entropy_bound':>13} {'max_steps':>9} {'sort_exact':>10} {'tokens/s':>9} {'tok/fwd':>7} "
          f"{'steps/canvas':>12}")
    for r in results:
        print(f"{r.entropy_bound:>13g} {r.max_steps:>9d} {r.sort_exact_match:>10.3f} {r.tokens_per_second:>9.1f} "
              f"{r.tokens_per_forward:>7.2f} {r.steps_per_canvas:>12.1f}")
    if "execution_modes" in report:
        m = report["execution_modes"]
        print(f"engine, default setting: exact mode {m['exact']:.3f}, fast mode {m['fast']:.3f} "
              f"({m['fast_minus_exact_points']:+.1f} points)")
    for row in report.get("hf_cross_check", []):
        print(f"transformers @ bound {row['entropy_bound']:g}, {row['max_steps']} steps: exact match "
              f"{row['hf_exact_match']:.3f} (dgserve {row['dgserve_exact_match']:.3f}), identical outputs "
              f"{row['identical_outputs']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
