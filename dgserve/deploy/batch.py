"""Offline batch generation: a JSONL or Parquet file of prompts through an autoscaled pool of engines (Ray Data).

The pipeline is ``read -> prepare (parse, validate, skip ids already done) -> map_batches(EngineWorker)`` with an
actor pool of ``min_workers..max_workers`` that Ray Data grows while inputs queue up. Each actor holds one
``Engine`` and runs every batch it is handed through it together (continuous batching over the batch).

Durability: the driver writes results into part files next to the output (``OUT.parts/``), each written to a
temporary name, fsynced and renamed, so a part is either whole or absent; at the end the parts and any earlier
output are merged, deduplicated by id, into the output (again by rename). A rerun reads the ids in the output and
in the parts and skips them, so a job killed at any moment resumes with no row lost, corrupt or duplicated.
Rows that cannot be processed (bad JSON, no prompt, prompt too long, engine failure) go to the errors file with
the reason; the errors file describes the rows of the latest run that failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from dgserve.config import DEFAULT_MODEL, ImageSettings
from dgserve.routing.openai_protocol import ChatMessage, image_urls
from dgserve.routing.tool_calls import ToolFormatError, template_messages, template_supports_tools

if TYPE_CHECKING:
    from dgserve.engine.request import PromptImage

log = logging.getLogger(__name__)

Format = Literal["jsonl", "parquet"]
RAW_LIMIT = 500  # characters of a bad row kept in the errors file
# at most this many input rows not in the output yet: read the input here first, in case none needs an engine
LOCAL_RECHECK_ROWS = 10_000
OUTPUT_COLUMNS = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens")


class BatchError(ValueError):
    """A user-caused problem with the job as a whole (bad path, unreadable existing output, bad option)."""


class BatchJob(BaseModel):
    """One ``dgserve batch`` run."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: str = DEFAULT_MODEL
    revision: str | None = Field(None, description="with a Hugging Face model id: its branch, tag or commit")
    input: str
    output: str
    errors: str | None = Field(None, description="errors file (JSONL; default OUTPUT.errors.jsonl)")
    min_workers: int = Field(1, ge=1)
    max_workers: int | None = Field(None, ge=1, description="default: min_workers")
    address: str | None = Field(None, description="Ray address; default: start a local Ray")
    max_tokens: int = Field(256, ge=1, le=1 << 20)
    seed: int | None = Field(None, ge=0, description="per-row seeds derived from this and the row id")
    steps: int | None = Field(None, ge=1, le=1024, description="max denoising steps per canvas")
    batch_size: int = Field(32, ge=1, le=4096, description="prompts per engine call")
    worker_cpus: float = Field(1.0, gt=0.0)
    worker_gpus: float = Field(0.0, ge=0.0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "fp8"] = Field("none", description="fp8: FP8 weights (dgserve.model.quantization)")
    fp8_emulation: bool = Field(False, description="with fp8 on CPU workers: emulate the FP8 arithmetic")
    vision: Literal["auto", "off"] = Field("auto", description="auto: rows may hold image_url parts (a checkpoint "
                                           "with a vision tower); off: text only")
    images: ImageSettings = ImageSettings()
    kv_cache_memory: int | None = Field(None, gt=0, description="bytes per worker; default: the engine's "
                                                                "(EngineConfig.kv_cache_memory)")
    execution: Literal["auto", "exact", "fast"] = Field("auto", description="the engines' execution mode")
    flush_rows: int = Field(256, ge=1, description="rows per part file")
    flush_seconds: float = Field(10.0, gt=0.0, description="longest wait before results are made durable")

    @model_validator(mode="after")
    def _check(self) -> BatchJob:
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) < min_workers ({self.min_workers})")
        if Path(self.input).resolve() == Path(self.output).resolve():
            raise ValueError("output must differ from input")
        if self.fp8_emulation and self.quantization != "fp8":
            raise ValueError("--fp8-emulation emulates FP8 weights: it needs --quantization fp8")
        if self.quantization == "fp8" and not self.fp8_emulation and self.worker_gpus == 0:
            from dgserve.model.quantization import CPU_FP8_MESSAGE

            raise ValueError(CPU_FP8_MESSAGE.format(device="the workers' CPU (--worker-gpus 0)"))
        return self

    @property
    def errors_path(self) -> Path:
        return Path(self.errors) if self.errors else Path(self.output + ".errors.jsonl")

    @property
    def pool_max(self) -> int:
        return self.max_workers or self.min_workers


@dataclass
class Progress:
    """Running totals the driver reports after every result batch."""

    total_rows: int  # rows in the input
    skipped: int  # rows already in the output before this run
    done: int = 0  # rows written this run
    errors: int = 0
    tokens: int = 0  # completion tokens this run
    elapsed_s: float = 0.0
    workers: set[str] = field(default_factory=set)  # pool actors that returned results
    data_stats: str = ""  # Ray Data's execution stats, at the end

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class BatchSummary:
    output: str
    errors_file: str
    total_rows: int
    skipped: int  # already in the output before this run
    written: int  # new output rows
    errors: int
    tokens: int
    seconds: float
    workers: int  # distinct pool actors that produced results
    workers_started: int  # pool actors that came up (the pool's growth under backlog)
    data_stats: str = ""  # Ray Data's execution stats


def detect_format(path: str | Path) -> Format:
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise BatchError(f"{path}: unknown format; use a .jsonl or .parquet file")


def row_key(row_id: Any) -> str:
    """The id as the dedupe key (1 and "1" are the same row: Parquet output may store ids as strings)."""
    return str(row_id)


def derive_seed(seed: int, key: str) -> int:
    """A per-row seed from the job seed and the row id, independent of batching and worker."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little") & 0x7FFF_FFFF


# ----------------------------------------------------------------------------------------------------------------
# Input rows
# ----------------------------------------------------------------------------------------------------------------


class InputRow(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: StrictStr | StrictInt
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_prompt(self) -> InputRow:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" and "messages"')
        if self.prompt is not None and not self.prompt:
            raise ValueError('"prompt" is empty')
        return self


def _row_error(exc: ValidationError) -> str:
    e = exc.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _raw(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:RAW_LIMIT]


class Prepare:
    """Ray Data stage (small actors, each holding the set of ids already done): parse and validate rows, drop
    the ids already done. Output columns are all strings, so every block has the same schema."""

    def __init__(self, fmt: Format, done: set[str]) -> None:
        self.fmt = fmt
        self.done = done

    def __call__(self, batch: Any) -> dict[str, list[str]]:
        done = self.done
        out: dict[str, list[str]] = {"key": [], "id": [], "request": [], "error": [], "raw": []}
        for item in batch.to_pylist():
            key, row_id, request, error, raw = self._one(item)
            if not error and key in done:
                continue
            for col, v in zip(out, (key, row_id, request, error, raw), strict=True):
                out[col].append(v)
        return out

    def _one(self, item: dict[str, Any]) -> tuple[str, str, str, str, str]:
        if self.fmt == "jsonl":
            line = item["text"]
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                return "", "null", "", f"bad JSON: {exc.msg} at column {exc.colno}", _raw(line)
            if not isinstance(data, dict):
                return "", "null", "", f"expected a JSON object, got {type(data).__name__}", _raw(line)
        else:
            data = {k: v for k, v in item.items() if v is not None}
            line = data
        row_id = data.get("id")
        if "id" not in data:
            return "", "null", "", 'missing "id"', _raw(line)
        if not isinstance(row_id, str | int) or isinstance(row_id, bool):
            return "", "null", "", f'"id" must be a string or an integer, got {type(row_id).__name__}', _raw(line)
        id_json = json.dumps(row_id)
        try:
            row = InputRow.model_validate(data)
        except ValidationError as exc:
            return "", id_json, "", _row_error(exc), _raw(line)
        request = row.model_dump(exclude={"id"}, exclude_none=True)
        return row_key(row.id), id_json, json.dumps(request), "", ""


# ----------------------------------------------------------------------------------------------------------------
# The engine actor
# ----------------------------------------------------------------------------------------------------------------


class EngineWorker:
    """Ray Data actor: one engine; each call runs its whole batch through it together."""

    def __init__(self, job: dict[str, Any], registry: Any = None) -> None:
        self.worker_id = self._actor_id()
        if registry is not None:  # first thing, so the driver sees the pool grow even on a short job
            registry.register.remote(self.worker_id)
        import torch

        from dgserve.engine.engine import Engine, EngineConfig
        from dgserve.model.checkpoint import load
        from dgserve.routing.prompts import PromptEncoder

        self.job = BatchJob.model_validate(job)
        torch.set_num_threads(max(1, int(self.job.worker_cpus)))
        device = "cuda" if self.job.worker_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.loaded = load(self.job.model, dtype=self.job.dtype, device=device, revision=self.job.revision,
                           vision=self.job.vision, quantization=self.job.quantization,
                           fp8_emulation=self.job.fp8_emulation)
        if self.loaded.tokenizer is None:
            raise RuntimeError(f"{self.job.model}: the checkpoint has no tokenizer.json, so prompts cannot be "
                               "encoded")
        vision = self.loaded.vision
        self._make_engine = lambda: Engine(self.loaded.model, self.loaded.generation, self.loaded.tokenizer,
                                           EngineConfig(kv_cache_memory=self.job.kv_cache_memory,
                                                        execution=self.job.execution,
                                                        max_running=min(self.job.batch_size, 256),
                                                        max_waiting=max(self.job.batch_size, 1)), vision=vision)
        self.engine = self._make_engine()
        # the API's encoding and checks, image parts included
        self.prompts = PromptEncoder(self.loaded.config, self.loaded.tokenizer, vision.spec if vision else None,
                                     self.job.images, vision_off=self.job.vision == "off")
        self.sampling = self.loaded.generation.sampling
        if self.job.steps is not None:
            self.sampling = self.sampling.model_copy(update={"max_denoising_steps": self.job.steps})
        self.context = self.loaded.config.text.max_position_embeddings

    def _prompt(self, request: dict[str, Any]) -> tuple[list[int], tuple[PromptImage, ...]]:
        """A row's prompt ids (and images: a chat's image_url parts, loaded and expanded as the API does)."""
        from dgserve.routing.images import ImageURL
        from dgserve.routing.prompts import InvalidPromptError

        if "messages" not in request:
            return self.prompts.encode(request["prompt"]), ()
        chat = [ChatMessage.model_validate(m) for m in request["messages"]]
        if any(m.tool_calls or m.role == "tool" for m in chat) and not template_supports_tools(
                self.loaded.tokenizer.chat_template):
            raise InvalidPromptError("this model's chat template has no tool format, so it cannot be shown tool "
                                     "calls or tool results", "messages")
        try:  # tool calls and results as the API passes them to the chat template
            messages = template_messages(chat)
        except ToolFormatError as exc:
            raise InvalidPromptError(str(exc), "messages") from exc
        urls = [ImageURL(url, where) for url, where in image_urls(chat)]
        if not urls:
            return self.prompts.encode_chat(messages), ()
        return asyncio.run(self.prompts.encode_chat_with_images(messages, urls))

    @staticmethod
    def _actor_id() -> str:
        import ray

        if not ray.is_initialized():  # outside Ray (unit tests); get_runtime_context() would start one
            return f"pid-{os.getpid()}"
        return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest, InvalidRequest, PromptTooLong
        from dgserve.routing.prompts import InvalidPromptError

        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        results: dict[str, dict[str, Any]] = {}
        texts: dict[str, list[str]] = {}
        for i, row in enumerate(rows):
            rid = str(i)
            if row["error"]:
                results[rid] = {"error": row["error"]}
                continue
            request = json.loads(row["request"])
            try:
                ids, images = self._prompt(request)
                max_tokens = request.get("max_tokens", self.job.max_tokens)
                if len(ids) + max_tokens > self.context:
                    raise PromptTooLong(f"{len(ids)} prompt tokens + max_tokens {max_tokens} > the model's context "
                                        f"of {self.context}")
                seed = request.get("seed")
                if seed is None and self.job.seed is not None:
                    seed = derive_seed(self.job.seed, row["key"])
                self.engine.add_request(GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, seed=seed,
                                                          sampling=self.sampling, request_id=rid, images=images))
            except PromptTooLong as exc:
                results[rid] = {"error": f"prompt too long: {exc}"}
                continue
            except (InvalidPromptError, InvalidRequest) as exc:
                results[rid] = {"error": str(exc)}
                continue
            except Exception as exc:  # a bug, not the row's fault; still, it must not fail its batch-mates
                log.exception("row %s could not be submitted", row["key"])
                results[rid] = {"error": f"internal error: {type(exc).__name__}: {exc}"}
                continue
            texts[rid] = []
        try:
            events = self.engine.run_until_done()
        except Exception as exc:  # the engine is in an unknown state: fail this batch's rows, start afresh
            log.exception("engine failed on a batch of %d rows", len(rows))
            self.engine = self._make_engine()
            events = []
            for rid in texts:
                results[rid] = {"error": f"engine failure: {exc}"}
            texts.clear()
        for ev in events:
            if isinstance(ev, CanvasEvent) and ev.request_id in texts:
                texts[ev.request_id].append(ev.text)
            elif isinstance(ev, FinalEvent) and ev.request_id in texts:
                if ev.finish_reason == "error":
                    results[ev.request_id] = {"error": f"engine error: {ev.error}"}
                else:
                    results[ev.request_id] = {"text": "".join(texts[ev.request_id]),
                                              "finish_reason": ev.finish_reason,
                                              "prompt_tokens": ev.stats.prompt_tokens,
                                              "completion_tokens": ev.stats.completion_tokens}
        out: dict[str, list[Any]] = {c: [] for c in ("key", "id", "text", "finish_reason", "prompt_tokens",
                                                     "completion_tokens", "error", "raw", "worker")}
        for i, row in enumerate(rows):
            res = results.get(str(i)) or {"error": "engine returned no result"}
            out["key"].append(row["key"])
            out["id"].append(row["id"])
            out["text"].append(res.get("text", ""))
            out["finish_reason"].append(res.get("finish_reason", ""))
            out["prompt_tokens"].append(int(res.get("prompt_tokens", 0)))
            out["completion_tokens"].append(int(res.get("completion_tokens", 0)))
            out["error"].append(res.get("error", ""))
            out["raw"].append(row["raw"] if res.get("error") and row["raw"] else "")
            out["worker"].append(self.worker_id)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Output: part files, resume, merge
# ----------------------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputStore:
    """The output file plus its ``.parts/`` directory of atomically written part files."""

    def __init__(self, path: str | Path, fmt: Format) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.parts_dir = Path(str(self.path) + ".parts")
        self.run_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"  # sorts by start time
        self._seq = 0
        if not self.path.parent.is_dir():
            raise BatchError(f"{self.path}: directory {self.path.parent} does not exist")

    def _ext(self) -> str:
        return ".parquet" if self.fmt == "parquet" else ".jsonl"

    def parts(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.iterdir() if p.name.startswith("part-") and p.suffix == self._ext())

    def _sources(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + self.parts()

    def _read_rows(self, source: Path) -> Iterator[dict[str, Any]]:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(source)
            except Exception as exc:
                raise BatchError(f"{source}: cannot read the existing output as Parquet ({exc}); move it away "
                                 "to start over") from None
            if "id" not in table.column_names:
                raise BatchError(f"{source}: the existing output has no 'id' column; move it away to start over")
            yield from table.to_pylist()
            return
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise BatchError(f"{source}: line {n} is not JSON; the output was not written by dgserve batch "
                                     "(move it away to start over)") from None
                if not isinstance(row, dict) or "id" not in row:
                    raise BatchError(f"{source}: line {n} has no 'id'; move the file away to start over")
                yield row

    def done_keys(self) -> set[str]:
        """Ids already written (in the output or in parts of an interrupted run); removes stale temp files."""
        if self.parts_dir.is_dir():
            for p in self.parts_dir.iterdir():
                if p.name.startswith(".tmp-"):
                    p.unlink(missing_ok=True)
        return {row_key(r["id"]) for src in self._sources() for r in self._read_rows(src)}

    def write_part(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self.parts_dir.mkdir(exist_ok=True)
        self._seq += 1
        final = self.parts_dir / f"part-{self.run_id}-{self._seq:06d}{self._ext()}"
        tmp = self.parts_dir / f".tmp-{final.name}"
        self._write_file(tmp, rows)
        os.replace(tmp, final)
        _fsync_dir(self.parts_dir)

    def _write_file(self, path: Path, rows: list[dict[str, Any]]) -> None:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(_rows_to_table(rows), path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            with open(path, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def finalize(self) -> int:
        """Merge output + parts into the output (deduplicated by id, first copy wins); returns the row count."""
        sources = self._sources()
        if not self.parts():
            return sum(1 for src in sources for _ in self._read_rows(src))
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        tmp = self.path.with_name(f".{self.path.name}.{self.run_id}.tmp")
        try:
            if self.fmt == "jsonl":
                with open(tmp, "w", encoding="utf-8") as f:
                    for src in sources:
                        for r in self._read_rows(src):
                            k = row_key(r["id"])
                            if k not in seen:
                                seen.add(k)
                                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            else:
                for src in sources:
                    for r in self._read_rows(src):
                        k = row_key(r["id"])
                        if k not in seen:
                            seen.add(k)
                            rows.append(r)
                self._write_file(tmp, rows)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)
        shutil.rmtree(self.parts_dir, ignore_errors=True)  # after the rename: a kill here leaves parts merge-safe
        return len(seen)


def _rows_to_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    ids = [r["id"] for r in rows]
    if not (all(isinstance(i, int) for i in ids) or all(isinstance(i, str) for i in ids)):
        ids = [str(i) for i in ids]  # one Arrow type per column; the dedupe key is str(id) anyway
    cols = {"id": ids, **{c: [r.get(c) for r in rows] for c in OUTPUT_COLUMNS if c != "id"}}
    return pa.table(cols)


class ErrorLog:
    """The errors file: truncated at the start of a run, appended and fsynced per result batch."""

    def __init__(self, path: Path) -> None:
        if not path.parent.is_dir():
            raise BatchError(f"{path}: directory {path.parent} does not exist")
        self.path = path
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - held open for the run
        self.count = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        for r in rows:
            self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.count += len(rows)

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------


def count_input_rows(path: Path, fmt: Format) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def leftover_rows(path: Path, fmt: Format, done: set[str]) -> tuple[int, list[dict[str, Any]]]:
    """By the Prepare stage's rules, read in this process: how many input rows still need an engine, and the
    error rows of those that never will (bad JSON, no id, no prompt). Lets a rerun with nothing left to do
    finish without starting Ray."""
    prepare = Prepare(fmt, done)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        items: Iterator[dict[str, Any]] = iter(pq.read_table(path).to_pylist())
    else:
        items = ({"text": line.rstrip("\r\n")} for line in path.open(encoding="utf-8", errors="replace")
                 if line.strip())
    pending, errors = 0, []
    for item in items:
        key, id_json, _, error, raw = prepare._one(item)
        if error:
            errors.append({"id": json.loads(id_json), "error": error, **({"raw": raw} if raw else {})})
        elif key not in done:
            pending += 1
    return pending, errors


def _check_model(model: str) -> None:
    """Fail before starting Ray (and every pool actor failing alike) when the model cannot be found."""
    from dgserve.model.checkpoint import SHIPPED_CHECKPOINTS, resolve_shipped
    from dgserve.model.config import PRESETS
    from dgserve.model.hub import is_hub_id

    if model in PRESETS or (Path(resolve_shipped(model)) / "config.json").is_file() or is_hub_id(model):
        return
    raise BatchError(f"{model}: not a checkpoint directory (no config.json), not a preset "
                     f"(presets: {', '.join(sorted({*PRESETS, *SHIPPED_CHECKPOINTS}))}) and not a Hugging Face "
                     "model id (owner/name)")


def _connect_ray(address: str | None) -> bool:
    """Make sure Ray is up; True when this call started it (and so should stop it)."""
    import ray

    from dgserve.cluster.local_ray import LIGHT_ENV, connect_ray, start_local_ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")  # set for drivers started by `ray job submit`
    if address:
        for k, v in LIGHT_ENV.items():
            os.environ.setdefault(k, v)
        connect_ray(address)
    else:
        start_local_ray()
    return True


class PoolRegistry:
    """A tiny Ray actor the engine actors check in with, so the driver knows how far the pool grew."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}

    def register(self, worker_id: str) -> None:
        self.started.setdefault(worker_id, time.time())

    def workers(self) -> dict[str, float]:
        return dict(self.started)


def build_dataset(job: BatchJob, done: set[str], registry: Any = None) -> Any:
    import ray.data

    fmt = detect_format(job.input)
    ds = ray.data.read_text(job.input) if fmt == "jsonl" else ray.data.read_parquet(job.input)
    # small blocks so that a file read as one block still spreads over the pool
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    ds = ds.map_batches(Prepare, fn_constructor_args=(fmt, done), batch_format="pyarrow", batch_size=None,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4), num_cpus=0.1)
    return ds.map_batches(EngineWorker, fn_constructor_args=(job.model_dump(), registry), batch_size=job.batch_size,
                          batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(min_size=job.min_workers, max_size=job.pool_max),
                          num_cpus=job.worker_cpus, num_gpus=job.worker_gpus or None)


def run_batch(job: BatchJob, on_progress: Callable[[Progress], None] | None = None) -> BatchSummary:
    """Run (or resume) a batch job; returns what it did. Raises ``BatchError`` for job-level problems."""
    in_path = Path(job.input)
    if not in_path.exists():
        raise BatchError(f"{in_path}: no such file")
    in_fmt = detect_format(in_path)
    if job.address is None and not os.environ.get("RAY_ADDRESS"):  # remote: the path may exist only there
        _check_model(job.model)
    if not job.errors_path.parent.is_dir():
        raise BatchError(f"{job.errors_path}: directory {job.errors_path.parent} does not exist")
    store = OutputStore(job.output, detect_format(job.output))
    done = store.done_keys()
    total = count_input_rows(in_path, in_fmt)
    if total - len(done) <= LOCAL_RECHECK_ROWS:  # maybe nothing is left: find out without starting Ray
        t0 = time.monotonic()
        pending, bad = leftover_rows(in_path, in_fmt, done)
        if pending == 0:
            errors = ErrorLog(job.errors_path)
            try:
                errors.write(bad)
            finally:
                errors.close()
            store.finalize()  # parts of an interrupted run that had already written everything
            return BatchSummary(output=str(store.path), errors_file=str(errors.path), total_rows=total,
                                skipped=len(done), written=0, errors=errors.count, tokens=0,
                                seconds=time.monotonic() - t0, workers=0, workers_started=0)
    started_ray = _connect_ray(job.address)
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the CLI draws one line with tokens/s
    progress = Progress(total_rows=total, skipped=len(done))
    t0 = time.monotonic()
    registry = ray.remote(num_cpus=0)(PoolRegistry).remote()
    errors = ErrorLog(job.errors_path)
    try:
        _drive(job, build_dataset(job, done, registry), store, errors, progress, t0, on_progress)
        store.finalize()
        started = ray.get(registry.workers.remote())
    finally:
        errors.close()
        try:
            ray.kill(registry)
        except Exception:  # already gone with its job
            log.debug("registry kill failed", exc_info=True)
        if started_ray:
            ray.shutdown()
    return BatchSummary(output=str(store.path), errors_file=str(errors.path), total_rows=total,
                        skipped=len(done), written=progress.done, errors=errors.count, tokens=progress.tokens,
                        seconds=time.monotonic() - t0, workers=len(progress.workers), workers_started=len(started),
                        data_stats=progress.data_stats)


def _drive(job: BatchJob, ds: Any, store: OutputStore, errors: ErrorLog, progress: Progress, t0: float,
           on_progress: Callable[[Progress], None] | None) -> None:
    """Consume the dataset's results: errors to the errors file, outputs into durable part files."""
    pending: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    written: set[str] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        bad: list[dict[str, Any]] = []
        for r in batch.to_pylist():
            progress.workers.add(r["worker"])
            row_id = json.loads(r["id"])
            if r["error"]:
                bad.append({"id": row_id, "error": r["error"], **({"raw": r["raw"]} if r["raw"] else {})})
                continue
            if r["key"] in written:
                bad.append({"id": row_id, "error": "duplicate id: an earlier row with this id was written"})
                continue
            written.add(r["key"])
            pending.append({"id": row_id, "text": r["text"], "finish_reason": r["finish_reason"],
                            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"]})
            progress.tokens += r["completion_tokens"]
        errors.write(bad)
        progress.errors = errors.count
        if len(pending) >= job.flush_rows or time.monotonic() - last_flush >= job.flush_seconds:
            store.write_part(pending)
            progress.done += len(pending)
            pending, last_flush = [], time.monotonic()
        progress.elapsed_s = time.monotonic() - t0
        if on_progress is not None:
            on_progress(progress)
    store.write_part(pending)
    progress.done += len(pending)
    progress.elapsed_s = time.monotonic() - t0
    if on_progress is not None:
        on_progress(progress)
    progress.data_stats = _stats(ds)


def _stats(ds: Any) -> str:
    try:
        return ds.stats()
    except Exception:  # diagnostics only
        log.debug("no Ray Data stats", exc_info=True)
        return ""
