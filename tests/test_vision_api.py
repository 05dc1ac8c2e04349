"""Image parts through the OpenAI API (the FastAPI app over an in-process engine): base64 and allow-listed http
images answered; corrupt, unsupported, too many, too large, refused and timed-out images each a clear 400 with the
server unaffected; ``vision: off`` refusing images with a 400 that says how to turn them on."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from werkzeug import Response

from dgserve.config import ImageFetchSettings, ImageSettings
from dgserve.engine.engine import EngineConfig
from dgserve.model.image_processing import ImageLimits
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.routing.images import ImageURL
from dgserve.routing.ingress_app import build_fastapi_app

MODEL = "vision"
LIMITS = ImageLimits(max_images_per_request=2, max_pixels=200_000, max_bytes=300_000)


def png(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def flat(size: tuple[int, int]) -> bytes:
    """A one-colour PNG: few bytes, many pixels."""
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 60, 90)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def chat(*parts: dict, text: str = "what is in this picture?", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}],
            "max_tokens": 8, "seed": 1, "ignore_eos": True, **extra}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def backends(vision_reference):
    path = str(vision_reference[1])
    settings = ImageSettings(limits=LIMITS, fetch=ImageFetchSettings(enabled=True, allowed_hosts=["127.0.0.1"],
                                                                      timeout_s=0.5))
    config = EngineConfig(kv_cache_memory=8 << 20, block_size=4)
    on = EngineChatBackend.load(path, engine_config=config, model_id=MODEL, images=settings)
    off = EngineChatBackend.load(path, engine_config=config, model_id=MODEL, images=settings, vision="off")
    yield on, off
    on.shutdown()
    off.shutdown()


def post(backend, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_fastapi_app(backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(go())


def test_one_and_two_images_are_answered(backends):
    on, _ = backends
    n_images = on.client.engine.vision_images
    one = post(on, chat(image(data_url(png(1)))))
    assert one.status_code == 200, one.text
    assert one.json()["usage"]["completion_tokens"] == 8
    two = post(on, chat(image(data_url(png(2), "image/png")), image(data_url(png(3, fmt="JPEG"), "image/jpeg"))))
    assert two.status_code == 200, two.text
    assert on.client.engine.vision_images == n_images + 3
    # each image's placeholder became <start_of_image> <image> x n <end_of_image>: 48x40 -> 8x8 soft tokens
    text_only = post(on, {**chat(), "messages": [{"role": "user", "content": "what is in this picture?"}]})
    soft = on._prompts._processor.preprocess(Image.open(io.BytesIO(png(1)))).num_soft_tokens
    assert one.json()["usage"]["prompt_tokens"] == text_only.json()["usage"]["prompt_tokens"] + soft + 2


def test_allow_listed_http_image_is_fetched(backends, httpserver):
    on, _ = backends
    httpserver.expect_request("/cat.png").respond_with_data(png(4), content_type="image/png")
    answer = post(on, chat(image(f"http://127.0.0.1:{httpserver.port}/cat.png")))
    assert answer.status_code == 200, answer.text


def test_same_text_other_image_shares_no_kv(backends):
    """The prompt-cache accounting through the API: the same text with another image is served from the cache only
    up to the image; the same image again, well past it."""
    on, _ = backends
    text = "describe the colours of this picture in one long and careful sentence"
    first = post(on, chat(image(data_url(png(20))), text=text))
    other = post(on, chat(image(data_url(png(21))), text=text))
    again = post(on, chat(image(data_url(png(20))), text=text))
    assert all(r.status_code == 200 for r in (first, other, again))
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    _, (placed,) = asyncio.run(on.tokenize_chat_with_images(messages, [ImageURL(data_url(png(20)), "m")]))
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (other, again)]
    assert 0 < cached[0] <= placed.start and cached[1] >= placed.end


def _slow_server(httpserver) -> tuple[str, threading.Event]:
    release = threading.Event()

    def slow(_request):
        release.wait(5)
        return Response(png(5), content_type="image/png")

    httpserver.expect_request("/slow.png").respond_with_handler(slow)
    return f"http://127.0.0.1:{httpserver.port}/slow.png", release


@pytest.mark.parametrize(("part", "message"), [
    (image(data_url(b"\x89PNG\r\n\x1a\nthis is not really a png")), "messages[0].content[1]: the image is not a "
     "readable PNG, JPEG or WebP image"),
    (image(data_url(png(6, fmt="GIF"), "image/gif")), "data: URL of type 'image/gif'"),
    (image(data_url(png(6, fmt="BMP"), "image/png")), "is a BMP image; accepted formats are PNG, JPEG and WebP"),
    (image(data_url(flat((600, 400)))), "is 600x400 = 240000 pixels; the limit is 200000 pixels (max_pixels)"),
    (image("data:image/png;base64," + "A" * 500_000), "the limit is 300000 bytes (max_bytes)"),
    (image("file:///etc/passwd"), "messages[0].content[1]: file: image URLs are not accepted"),
    (image("http://example.com/cat.png"), "host example.com:80 is not in the server's allow-list"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "content parts of type 'input_audio' "
     "are not supported"),
])
def test_bad_images_are_400s_and_the_server_carries_on(backends, part, message):
    on, _ = backends
    bad = post(on, chat(part))
    assert bad.status_code == 400, bad.text
    assert message in bad.json()["error"]["message"]
    assert post(on, chat(image(data_url(png(8))))).status_code == 200


def test_too_many_images_and_timeouts(backends, httpserver):
    on, _ = backends
    three = post(on, chat(*(image(data_url(png(i))) for i in range(3))))
    assert three.status_code == 400
    message = three.json()["error"]["message"]
    assert "the request has 3 images; at most 2 are allowed (max_images_per_request)" in message
    url, release = _slow_server(httpserver)
    try:
        slow = post(on, chat(image(url)))
    finally:
        release.set()
    assert slow.status_code == 400 and "took longer than 0.5 s" in slow.json()["error"]["message"]
    assert post(on, chat(image(data_url(png(9))))).status_code == 200


def test_vision_off_refuses_images_and_says_how_to_enable(backends):
    _, off = backends
    assert off.client.engine.vision is None
    refused = post(off, chat(image(data_url(png(10)))))
    assert refused.status_code == 400
    assert "vision: off" in refused.json()["error"]["message"]
    assert "vision: auto" in refused.json()["error"]["message"]
    text = post(off, {**chat(), "messages": [{"role": "user", "content": "hello"}]})
    assert text.status_code == 200


def test_batch_rows_take_the_same_image_parts(vision_reference, tmp_path):
    """``dgserve batch`` chat rows with image_url parts (outside Ray: one engine worker over one batch)."""
    from test_batch import FAST, _Rows

    from dgserve.deploy.batch import BatchJob, EngineWorker, Prepare

    def row(i: int, *parts: dict) -> str:
        return json.dumps({"id": i, "messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                                            *parts]}]})

    job = BatchJob(model=str(vision_reference[1]), input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.jsonl"),
                   seed=3, **FAST)
    lines = [row(1, image(data_url(png(11)))), row(2, image(data_url(png(12))), image(data_url(png(13)))),
             row(3, image("file:///etc/passwd")), row(4, image(data_url(b"not an image"))),
             json.dumps({"id": 5, "prompt": "plain text"})]
    prep = Prepare("jsonl", set())(_Rows([{"text": line} for line in lines]))
    out = EngineWorker(job.model_dump())({k: list(v) for k, v in prep.items()})
    assert out["error"][:2] == ["", ""] and out["error"][4] == ""
    assert "file: image URLs are not accepted" in out["error"][2]
    assert "not a readable PNG, JPEG or WebP image" in out["error"][3]
    assert out["prompt_tokens"][1] > out["prompt_tokens"][0] > 64  # one image's soft tokens, then two
    off = EngineWorker({**job.model_dump(), "vision": "off"})({k: list(v) for k, v in prep.items()})
    assert "vision: off" in off["error"][0] and off["error"][4] == ""
