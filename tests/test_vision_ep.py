"""Image prompts on an expert-parallel group (gloo on CPU): the vision tower is dense and replicated, so every
rank encodes its own requests' images; the tokens equal the single-process model's."""

from __future__ import annotations

import asyncio
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
from test_ep import _consume, run_group

from dgserve.model.placement import ExpertPlacement


def vision_rank(rank: int, world: int, port: int, ckpt: str, out_dir: str, backend: str, _scenarios: str) -> None:
    result: dict = {}
    try:
        from test_vision_engine import SAMPLING, picture
        from test_vision_generate import image_prompt

        from dgserve.cluster.process_group import create_store, init_ep_group
        from dgserve.engine.engine import EngineConfig
        from dgserve.engine.request import GenerationRequest
        from dgserve.engine.single import generate_single
        from dgserve.model.checkpoint import load
        from dgserve.replicas.ep_engine import build_ep_engine

        torch.set_num_threads(1)
        group = init_ep_group(rank, world, create_store("127.0.0.1", rank + 1, world, port=port),
                              device=torch.device("cpu"), backend=backend, timeout_s=60)
        full = load(ckpt)
        placement = ExpertPlacement.contiguous(full.config.text.num_experts, world)
        ep = build_ep_engine(ckpt, group, placement, engine_config=EngineConfig(kv_cache_memory=4 << 20,
                             prefill_chunk=512, block_size=4), idle_poll_s=0.005)
        pictures = [picture(10 + rank), picture(20 + rank, (30, 60))][:rank + 1]  # rank 0: one image; 1: two
        prompt, placed = image_prompt(full, pictures, seed=rank)
        request = GenerationRequest(prompt_ids=prompt, images=tuple(placed), max_tokens=20, seed=rank,
                                    sampling=SAMPLING, request_id=f"r{rank}", ignore_eos=True)
        tokens, final = asyncio.run(_consume(ep, request))
        solo = generate_single(full.model, prompt, max_tokens=20, seed=rank, sampling=SAMPLING, ignore_eos=True,
                               images=placed, vision=full.vision)
        result.update(equal=tokens == solo.token_ids, n=len(tokens), finish=final.finish_reason,
                      images=final.stats.images, vision_images=ep.engine.vision_images,
                      rank_has_vision=ep.engine.vision is not None)
        group.store.set(f"done/{rank}", "1")
        group.store.wait([f"done/{r}" for r in range(world)])
        ep.shutdown()
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)


@pytest.mark.slow  # two spawned processes, each importing torch and loading the model
def test_ep2_image_prompts_equal_single_process(vision_reference, tmp_path):
    results = run_group(2, vision_reference[1], tmp_path, worker=vision_rank)
    for rank, res in enumerate(results):
        assert res["rank_has_vision"] and res["equal"] and res["n"] == 20 and res["finish"] == "length", (rank, res)
        assert res["images"] == res["vision_images"] == rank + 1
