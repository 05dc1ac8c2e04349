"""The ``dgserve`` command line. Each subcommand validates its arguments with a strict pydantic
model and prints one clear line on bad input (exit status 2) instead of a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MODEL = "tiny-random"


class GenerateArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = DEFAULT_MODEL
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(256, ge=1, le=1 << 20)
    seed: int | None = Field(None, ge=0)
    steps: int | None = Field(None, ge=1, le=1024)
    chat: bool = False
    json_output: bool = False
    dtype: str = "float32"
    device: str = "cpu"


def _generate(args: GenerateArgs) -> int:
    import torch

    from dgserve.engine.single import generate_single
    from dgserve.model.checkpoint import load
    from dgserve.model.tokenizer import check_no_image_tokens

    loaded = load(args.model, dtype=args.dtype, device=args.device)
    tok = loaded.tokenizer
    if tok is None:
        raise UsageError(f"{args.model}: the checkpoint has no tokenizer.json, so a text prompt cannot be encoded")
    prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    check_no_image_tokens(prompt_ids, loaded.config.image_token_id if loaded.config.image_token_id is not None
                          and loaded.config.image_token_id < loaded.config.text.vocab_size else tok.image_id)
    sampling = loaded.generation.sampling
    if args.steps is not None:
        sampling = sampling.model_copy(update={"max_denoising_steps": args.steps})
    with torch.inference_mode():
        result = generate_single(loaded.model, prompt_ids, max_tokens=args.max_tokens, seed=args.seed,
                                 sampling=sampling, eos_token_ids=loaded.generation.eos_token_ids)
    text = tok.decode(result.token_ids)
    if args.json_output:
        stats = result.stats.as_dict()
        out = {"text": text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
               "stats": {k: stats[k] for k in ("new_tokens", "canvases", "denoise_steps", "tokens_per_forward",
                                               "seconds", "tokens_per_second")}}
        print(json.dumps(out))
    else:
        print(text)
    return 0


class UsageError(Exception):
    """A user-caused error the CLI reports in one line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgserve", description="Serve DiffusionGemma on Ray.")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text locally, no Ray involved")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or preset (default {DEFAULT_MODEL})")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int, help="max denoising steps per canvas (default: the checkpoint's)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object with stats")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    fields = {k: v for k, v in vars(ns).items() if k not in ("command", "log_level")}
    try:
        if ns.command == "generate":
            return _generate(GenerateArgs(**fields))
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"dgserve {ns.command}: invalid --{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: "
              f"{err['msg']}", file=sys.stderr)
        return 2
    except (UsageError, ValueError, OSError) as exc:
        print(f"dgserve {ns.command}: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
