"""`dgserve run` on a small image-and-text checkpoint (written by transformers' save_pretrained here), driven by
the official ``openai`` client over the real HTTP port: a chat with a base64 PNG is answered; the same text with
another image is not served from the first one's KV; a bad image is a 400 and the server carries on."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import hf_oracle
import numpy as np
import pytest
from dgserve_process import dgserve_run
from PIL import Image

from dgserve.model.image_processing import num_soft_tokens
from dgserve.model.vision_config import ImageProcessorConfig

pytestmark = pytest.mark.slow


def png_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_openai_client_sends_a_png_to_dgserve_run(vision_reference, tmp_path: Path):
    import openai

    model_dir = tmp_path / "vision-tiny"
    shutil.copytree(vision_reference[1], model_dir)
    with dgserve_run(["--model", str(model_dir)], tmp_path) as run:
        client = openai.OpenAI(base_url=f"{run.base}/v1", api_key="unused", timeout=120, max_retries=0)
        text = "what colours does this picture have? describe them one by one"

        def ask(image_url: str):
            return client.chat.completions.create(
                model="vision-tiny", max_tokens=16, seed=3,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                       {"type": "text", "text": text}]}],
                extra_body={"ignore_eos": True})

        first = ask(png_url(1))
        assert first.choices[0].message.content  # an answer (random weights: not a meaningful one)
        assert first.usage.completion_tokens == 16
        prompt_tokens = first.usage.prompt_tokens
        other = ask(png_url(2))  # same text, another image
        again = ask(png_url(1))
        assert other.usage.prompt_tokens == again.usage.prompt_tokens == prompt_tokens
        cached_other = other.usage.prompt_tokens_details.cached_tokens
        cached_again = again.usage.prompt_tokens_details.cached_tokens
        # the image (near the start) and the text after it are reused only for the same image
        soft = num_soft_tokens(40, 56, ImageProcessorConfig(**hf_oracle.VISION_SPECS["vision"].processor))
        assert cached_other < 16 and cached_again > soft + 16, (soft, cached_other, cached_again)

        with pytest.raises(openai.BadRequestError, match="is not a readable PNG, JPEG or WebP image"):
            ask("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode())
        with pytest.raises(openai.BadRequestError, match="file: image URLs are not accepted"):
            ask("file:///etc/passwd")
        assert ask(png_url(3)).choices[0].message.content  # the server carries on
