"""``dgserve generate``: one prompt through the single-request loop, locally, no Ray."""

from __future__ import annotations

import argparse
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dgserve.config import DEFAULT_MODEL
from dgserve.deploy.cli_support import (
    DEVICES,
    EXECUTION_HELP,
    THREADS_HELP,
    UsageError,
    add_quantization_args,
    check_device,
    check_quantization,
)


class GenerateArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = DEFAULT_MODEL
    revision: str | None = None
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(256, ge=1, le=1 << 20)
    seed: int | None = Field(None, ge=0)
    steps: int | None = Field(None, ge=1, le=1024)
    chat: bool = False
    json_output: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = Field(1, ge=1, le=1024)
    quantization: str = "none"
    fp8_emulation: bool = False
    execution: Literal["auto", "exact", "fast"] = "auto"

    @field_validator("device")
    @classmethod
    def _device_here(cls, v: str) -> str:
        return check_device(v)


def run(args: GenerateArgs) -> int:
    import torch

    from dgserve.engine.engine import resolve_execution
    from dgserve.engine.single import generate_single
    from dgserve.model.checkpoint import load
    from dgserve.model.tokenizer import check_no_image_tokens

    torch.set_num_threads(args.threads)
    check_quantization(args.quantization, args.fp8_emulation, args.device, args.dtype)
    loaded = load(args.model, dtype=args.dtype, device=args.device, revision=args.revision,
                  quantization=args.quantization, fp8_emulation=args.fp8_emulation)
    tok = loaded.tokenizer
    if tok is None:
        raise UsageError(f"{args.model}: the checkpoint has no tokenizer.json, so a text prompt cannot be encoded")
    prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    check_no_image_tokens(prompt_ids, loaded.config.image_token_id if loaded.config.image_token_id is not None
                          and loaded.config.image_token_id < loaded.config.text.vocab_size else tok.image_id)
    sampling = loaded.generation.sampling
    if args.steps is not None:
        sampling = sampling.model_copy(update={"max_denoising_steps": args.steps})
    if resolve_execution(args.execution, loaded.model.device) == "fast":
        result = _generate_fast(loaded, prompt_ids, args, sampling)
    else:
        with torch.inference_mode():
            result = generate_single(loaded.model, prompt_ids, max_tokens=args.max_tokens, seed=args.seed,
                                     sampling=sampling, eos_token_ids=loaded.generation.eos_token_ids,
                                     pad_token_id=loaded.generation.pad_token_id)
    text = tok.decode(result.token_ids)
    if args.json_output:
        stats = result.stats.as_dict()
        out = {"text": text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
               "threads": args.threads,
               "stats": {k: stats[k] for k in ("new_tokens", "completion_tokens", "canvases", "denoise_steps",
                                               "tokens_per_forward", "seconds", "tokens_per_second")}}
        print(json.dumps(out))
    else:
        print(text)
    return 0


def _generate_fast(loaded, prompt_ids: list[int], args: GenerateArgs, sampling):
    """The request through the engine in fast mode (the single-request loop is the exact path)."""
    from dgserve.engine.engine import Engine, EngineConfig
    from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
    from dgserve.engine.single import SingleResult

    engine = Engine(loaded.model, loaded.generation, None, EngineConfig(execution="fast", max_running=1))
    engine.add_request(GenerationRequest(prompt_ids=prompt_ids, max_tokens=args.max_tokens, seed=args.seed,
                                         sampling=sampling, request_id="generate"))
    ids: list[int] = []
    final: FinalEvent | None = None
    for ev in engine.run_until_done():
        if isinstance(ev, CanvasEvent):
            ids.extend(ev.token_ids)
        elif isinstance(ev, FinalEvent):
            final = ev
    assert final is not None
    if final.finish_reason == "error":
        raise UsageError(f"generation failed: {final.error}")
    return SingleResult(token_ids=ids, finish_reason=final.finish_reason, stats=final.stats)


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text locally, no Ray involved",
                       description="Run one prompt through the single-request denoising loop in this process (no "
                                   "Ray, no server) and print the text, or one JSON object with token ids and stats.")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory, preset or Hugging Face model id "
                                                          f"(default {DEFAULT_MODEL})")
    g.add_argument("--revision", help="with a Hugging Face model id: its branch, tag or commit (default main)")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--seed", type=int, help="sampler seed: the same seed, prompt and --threads give the same text")
    g.add_argument("--steps", type=int, help="max denoising steps per canvas (default: the checkpoint's)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object with stats")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight and activation dtype (default float32)")
    g.add_argument("--device", default="cpu", help=f"{', '.join(DEVICES)} or cuda:N (default cpu)")
    g.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    add_quantization_args(g)
    g.add_argument("--execution", default="auto", choices=["auto", "exact", "fast"], help=EXECUTION_HELP)
    g.set_defaults(handler=lambda ns: run(GenerateArgs(**ns)))
