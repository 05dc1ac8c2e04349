"""`dgserve batch`: bad rows to the errors file, resume after a kill with no duplicates, the actor pool growing
under backlog, Parquet in/out. Integration tests run on one local Ray (tiny-random, few steps, few tokens)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgserve.deploy.batch import BatchJob, EngineWorker, OutputStore, Prepare, run_batch
from dgserve.deploy.cli import main

BAD_LINES = {17: '{"id": 17, "prompt": "unterminated\n', 60: "not json at all\n", 101: '[1, 2, 3]\n',
             150: '{"id": 150}\n', 180: json.dumps({"id": 180, "prompt": "word " * 5000}) + "\n"}
FAST = {"max_tokens": 8, "steps": 4, "batch_size": 8, "kv_cache_memory": 32 << 20, "worker_cpus": 0.5}


def _write_prompts(path: Path, n: int = 200, bad: dict[int, str] | None = None) -> set[int]:
    """``n`` rows, those in ``bad`` malformed; returns the ids of the good ones."""
    bad = BAD_LINES if bad is None else bad
    good = set()
    with open(path, "w") as f:
        for i in range(n):
            if i in bad:
                f.write(bad[i])
            elif i % 7 == 3:
                f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"question {i}"}]}) + "\n")
                good.add(i)
            else:
                f.write(json.dumps({"id": i, "prompt": f"prompt number {i}"}) + "\n")
                good.add(i)
    return good


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- pure parts, no Ray ------------------------------------------------------------------------------------------

class _Rows:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def to_pylist(self) -> list[dict]:
        return self.rows


def test_prepare_validates_rows_and_skips_done_ids():
    lines = ['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"}', "{bad", '{"id": 3}',
             '{"id": 4, "prompt": "x", "messages": [{"role": "user", "content": "y"}]}', '{"id": true, "prompt": "z"}',
             '{"id": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}', '{"id": 5, "prompt": ""}']
    out = Prepare("jsonl", {"2"})(_Rows([{"text": line} for line in lines]))
    rows = [dict(zip(out, v, strict=True)) for v in zip(*out.values(), strict=True)]
    assert [r["key"] for r in rows if not r["error"]] == ["1", "c"]  # 2 is done
    chat = next(r for r in rows if r["key"] == "c")
    assert json.loads(chat["request"]) == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    errors = [r["error"] for r in rows if r["error"]]
    assert errors[0].startswith("bad JSON") and rows[1]["raw"] == "{bad"
    assert errors[1] == 'give exactly one of "prompt" and "messages"' and rows[2]["id"] == "3"
    assert errors[2] == 'give exactly one of "prompt" and "messages"'
    assert errors[3] == '"id" must be a string or an integer, got bool'
    assert errors[4] == '"prompt" is empty'


def test_output_store_survives_a_kill_at_any_point(tmp_path):
    out = tmp_path / "out.jsonl"
    first = OutputStore(out, "jsonl")
    first.write_part([{"id": 1, "text": "a"}, {"id": 2, "text": "b"}])
    first.write_part([{"id": 3, "text": "c"}])
    (first.parts_dir / ".tmp-part-killed-mid-write.jsonl").write_text('{"id": 4, "te')  # a kill mid-write
    again = OutputStore(out, "jsonl")
    assert again.done_keys() == {"1", "2", "3"}
    assert not any(p.name.startswith(".tmp-") for p in again.parts_dir.iterdir())
    again.write_part([{"id": 4, "text": "d"}])
    # a kill after the merged output was renamed into place but before the parts were removed
    parts = {p.name: p.read_bytes() for p in again.parts()}
    assert again.finalize() == 4
    again.parts_dir.mkdir()
    for name, data in parts.items():
        (again.parts_dir / name).write_bytes(data)
    third = OutputStore(out, "jsonl")
    assert third.done_keys() == {"1", "2", "3", "4"}
    assert third.finalize() == 4
    assert [r["id"] for r in _read_jsonl(out)] == [1, 2, 3, 4] and not third.parts_dir.exists()


def test_engine_worker_runs_a_batch_outside_ray(tmp_path):
    job = BatchJob(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"), seed=7, **FAST)
    worker = EngineWorker(job.model_dump())
    prep = Prepare("jsonl", set())(_Rows([{"text": line} for line in [
        '{"id": 1, "prompt": "hello"}', '{"id": 2, "messages": [{"role": "user", "content": "hi"}]}',
        json.dumps({"id": 3, "prompt": "word " * 5000}), "oops"]]))
    batch = {k: list(v) for k, v in prep.items()}
    out = worker(batch)
    assert out["key"] == ["1", "2", "3", ""]
    assert out["error"][:2] == ["", ""] and all(0 <= n <= 8 for n in out["completion_tokens"][:2])
    assert all(r in ("stop", "length") for r in out["finish_reason"][:2])
    assert out["error"][2].startswith("prompt too long") and out["error"][3].startswith("bad JSON")
    assert worker(batch)["text"][:2] == out["text"][:2]  # --seed: each row's seed comes from its id


def test_a_row_cut_by_max_tokens_says_length(tmp_path):
    """Issue 17: a batch row came back `stop` with completion_tokens == max_tokens. The shipped model answers the
    chat `sort 9 1 8 2 7 3` (seed 7) with 6 tokens, then EOS."""
    from dgserve.train.paths import TINY_DIR

    if not (TINY_DIR / "model.safetensors").is_file():
        pytest.skip("tiny not trained yet")
    job = BatchJob(model="tiny", input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"),
                   batch_size=4, kv_cache_memory=32 << 20, worker_cpus=1.0)
    chat = [{"role": "user", "content": "sort 9 1 8 2 7 3"}]
    rows = [json.dumps({"id": i, "messages": chat, "seed": 7, "max_tokens": n}) for i, n in enumerate([2, 5, 6, 32])]
    prep = Prepare("jsonl", set())(_Rows([{"text": line} for line in rows]))
    out = EngineWorker(job.model_dump())({k: list(v) for k, v in prep.items()})
    assert out["finish_reason"] == ["length", "length", "stop", "stop"]
    assert out["completion_tokens"] == [2, 5, 6, 6]
    assert [t.strip() for t in out["text"]] == ["1 2", "1 2 3 7 8", "1 2 3 7 8 9", "1 2 3 7 8 9"]


def test_tool_messages_in_a_batch_row(tmp_path):
    """A chat row with a tool call and its result: refused with the API's reason on a checkpoint whose template
    has no tool format (tiny-random's); a result naming no call is refused whatever the template."""
    job = BatchJob(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"), **FAST)
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    rows = [{"id": 1, "messages": [{"role": "user", "content": "q"}, call,
                                    {"role": "tool", "tool_call_id": "c1", "content": "1"}]},
            {"id": 2, "messages": [{"role": "user", "content": "q"},
                                    {"role": "tool", "tool_call_id": "zz", "content": "1"}]}]
    prep = Prepare("jsonl", set())(_Rows([{"text": json.dumps(r)} for r in rows]))
    out = EngineWorker(job.model_dump())({k: list(v) for k, v in prep.items()})
    assert "has no tool format" in out["error"][0]
    assert out["error"][1]  # refused (the template, or the call it names, says why)


@pytest.mark.parametrize(("args", "message"), [
    (["--min-workers", "3", "--max-workers", "2"], "max_workers (2) < min_workers (3)"),
    (["--input", "/nonexistent.jsonl"], "/nonexistent.jsonl: no such file"),
    (["--output", "out.csv"], "out.csv: unknown format"),
    (["--model", "/no/such/model"], "/no/such/model: not a checkpoint directory"),
    (["--max-tokens", "0"], "invalid --max-tokens"),
])
def test_bad_job_arguments_are_clear(tmp_path, capsys, args, message):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    base = {"--input": str(tmp_path / "in.jsonl"), "--output": str(tmp_path / "out.jsonl")}
    for flag in ("--input", "--output"):
        if flag in args:
            i = args.index(flag)
            base[flag] = args[i + 1] if args[i + 1].startswith("/") else str(tmp_path / args[i + 1])
            args = args[:i] + args[i + 2:]
    argv = ["batch", *[x for kv in base.items() for x in kv], *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


# -- on Ray ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_rows_go_to_errors_and_the_pool_grows_under_backlog(ray_session, tmp_path):
    good = _write_prompts(tmp_path / "in.jsonl")
    job = BatchJob(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"), min_workers=1,
                   max_workers=2, **{**FAST, "steps": 8})
    summary = run_batch(job)
    rows = _read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 195 and {r["id"] for r in rows} == good
    assert all(set(r) == {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"} for r in rows)
    assert all(0 <= r["completion_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in rows)
    errors = _read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert len(errors) == 5 == summary.errors
    reasons = sorted(e["error"].split(":")[0] for e in errors)
    assert reasons == ["bad JSON", "bad JSON", "expected a JSON object, got list", "give exactly one of \"prompt\" "
                       "and \"messages\"", "prompt too long"]
    assert {e["id"] for e in errors} == {None, 150, 180}
    assert summary.written == 195 and summary.tokens == sum(r["completion_tokens"] for r in rows)
    # min 1 / max 2: Ray Data started one engine actor, then a second one for the backlog
    assert summary.workers_started == 2, summary.data_stats
    assert not (tmp_path / "out.jsonl.parts").exists()


@pytest.mark.slow
def test_kill_midway_then_rerun_gives_every_row_exactly_once(ray_session, tmp_path):
    good = _write_prompts(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    args = ["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--max-workers", "1",
            "--flush-rows", "8", "--max-tokens", "8", "--steps", "4", "--batch-size", "8", "--kv-cache-memory",
            str(32 << 20), "--quiet"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_worker_prestart": "0",
           "RAY_prestart_worker_first_driver": "0"}
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "dgserve.deploy.cli", *args, "--address", address], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + 180
    while not (parts.is_dir() and len(list(parts.glob("part-*"))) >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no part files after 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not out.exists(), "the job finished before it was killed"
    written = sum(len(_read_jsonl(p)) for p in parts.glob("part-*"))
    assert 0 < written < 195
    summary = run_batch(BatchJob(input=str(tmp_path / "in.jsonl"), output=str(out), max_workers=1, **FAST))
    assert summary.skipped == written and summary.written == 195 - written
    rows = _read_jsonl(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == 195 and len(set(ids)) == 195 and set(ids) == good
    assert len(_read_jsonl(tmp_path / "out.jsonl.errors.jsonl")) == 5


@pytest.mark.slow
def test_parquet_round_trip(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"row-{i}" for i in range(40)]
    table = pa.table({
        "id": ids,
        "prompt": [None if i % 4 == 0 else f"prompt {i}" for i in range(40)],
        "messages": [[{"role": "user", "content": f"chat {i}"}] if i % 4 == 0 else None for i in range(40)],
    })
    pq.write_table(table, tmp_path / "in.parquet")
    summary = run_batch(BatchJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out.parquet"),
                                 max_workers=1, seed=3, **FAST))
    assert summary.errors == 0 and summary.written == 40
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["id", "text", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert sorted(out.column("id").to_pylist()) == sorted(ids)
    assert all(0 <= n <= 8 for n in out.column("completion_tokens").to_pylist())
