"""The README's `openai` client example (issue 17, item 14) runs as printed against a real HTTP server: uvicorn on
a loopback port serving the FastAPI app over an in-process engine with the shipped ``tiny`` model. It checks the
extensions through ``extra_body``, the shape of draft chunks and of the final usage chunk, and the loop that
tells them apart."""

from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dgserve.train.paths import TINY_DIR

pytestmark = pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny not trained yet")
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_client_example() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (example,) = [b for b in blocks if "from openai import OpenAI" in b]
    return example


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    import uvicorn

    from dgserve.routing.chat_backend import EngineChatBackend
    from dgserve.routing.ingress_app import build_fastapi_app

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = EngineChatBackend.load("tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_fastapi_app(backend), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        backend.shutdown()
        torch.set_num_threads(before)


def test_the_readme_openai_example_runs_as_printed(server_url) -> None:
    code = readme_client_example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and "extra_body" in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("http://127.0.0.1:8000", server_url), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "1 4 7 9 stop 4", lines  # temperature=0 with extensions: the sorted digits, EOS, 4 tokens
    drafts = [line for line in lines if line.startswith("draft of canvas 0 after step ")]
    assert drafts, lines  # draft_every=1: the canvas' snapshots before it was committed
    assert lines[-2] == "completion tokens: 4" and lines[-1] == "answer: 1 4 7 9", lines
