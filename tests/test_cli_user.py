"""The rough CLI edges a new user hit (issue 17, items 7-11), through the installed ``dgserve`` console script in a
subprocess, as a user types it. None of these start Ray: every error here is found before that."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from console import dgserve, one_line_error

from dgserve.deploy.cli import _parser

# --------------------------------------------------------------- 7. config files: say the file and the field


@pytest.mark.parametrize(("text", "expected"), [
    ("replicas:\n  num_replica: 2\n", "deploy.yaml: replicas.num_replica: unknown field"),
    ("model:\n  dtype: fp8\n", "deploy.yaml: model.dtype: Input should be 'float32', 'bfloat16' or 'float16' "
                               "(got 'fp8')"),
    ("model:\n  path: tiny\n replicas: 2\n", "deploy.yaml: line 3: not valid YAML"),
    ("", "deploy.yaml: the file is empty; expected a mapping of settings"),
])
@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_run_and_build_report_config_errors_alike(tmp_path, text, expected) -> None:
    (tmp_path / "deploy.yaml").write_text(text)
    run = one_line_error(dgserve("run", "--config", "deploy.yaml", cwd=tmp_path), "run")
    build = one_line_error(dgserve("build", "--config", "deploy.yaml", cwd=tmp_path), "build")
    assert expected in run and expected in build
    assert run.removeprefix("dgserve run: ") == build.removeprefix("dgserve build: ")


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_build_rejects_an_unknown_preset_as_run_does(tmp_path) -> None:
    (tmp_path / "deploy.yaml").write_text("model:\n  path: tiny-randm\n")
    build = one_line_error(dgserve("build", "--config", "deploy.yaml", cwd=tmp_path), "build")
    run = one_line_error(dgserve("run", "--config", "deploy.yaml", cwd=tmp_path), "run")
    assert "tiny-randm: not a preset (presets: " in build and "tiny-random" in build
    assert "tiny-randm: not a checkpoint directory, not a preset" in run
    for fine in ("tiny-random", "/models/on/the/cluster", "google/diffusiongemma-26B-A4B-it"):
        (tmp_path / "deploy.yaml").write_text(f"model:\n  path: {fine}\n")
        assert dgserve("build", "--config", "deploy.yaml", cwd=tmp_path).returncode == 0, fine


# ------------------------------------------------------------------------------ 8. a port already in use


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_run_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(dgserve("run", "--port", str(port)), "run")
    assert line == f"dgserve run: port {port} on 127.0.0.1 is in use; stop what listens there or pick another --port"


# ------------------------------------------------------------------------------------- 9. --device checked


@pytest.mark.slow  # runs the dgserve console script in a subprocess
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["run"]])
def test_device_cuda_without_cuda_is_one_line(command) -> None:
    line = one_line_error(dgserve(*command, "--device", "cuda"), command[0])
    assert "cuda: CUDA is not available on this machine" in line and "use cpu" in line
    assert "is not a device" in one_line_error(dgserve(*command, "--device", "gpu"), command[0])


# -------------------------------------------------------------------------------------------- 10. --threads


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_threads_option_and_its_default() -> None:
    from dgserve.deploy.cmd_run import RunArgs, _deploy_config

    base = ["generate", "--model", "tiny-random", "--prompt", "hi", "--json", "--max-tokens", "16", "--seed", "3"]
    default, two = (json.loads(dgserve(*base, *extra).stdout) for extra in ([], ["--threads", "2"]))
    assert default["threads"] == 1 and two["threads"] == 2  # one thread unless asked: no oversubscription
    assert one_line_error(dgserve(*base, "--threads", "0"), "generate").endswith(
        "invalid --threads: Input should be greater than or equal to 1")
    # a replica's torch threads are the CPUs Ray reserves for it (Ray sets OMP_NUM_THREADS from them)
    assert _deploy_config(RunArgs()).replicas.num_cpus == 0.5
    assert _deploy_config(RunArgs(threads=3)).replicas.num_cpus == 3.0


# --------------------------------------------------------------------------------------- 11. the rough edges


def test_every_subcommand_and_flag_is_described() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"run", "generate", "build", "deploy", "status", "batch", "dashboards", "bench",
                                "train", "eval"}
    undocumented = [f"{name} {action.option_strings or action.dest}" for name, command in sub.choices.items()
                    for action in command._actions if not action.help]
    undescribed = [name for name, command in sub.choices.items() if not command.description]
    assert undocumented == [] and undescribed == []
    kv_flags = {o for command in sub.choices.values() for a in command._actions for o in a.option_strings
                if o.startswith("--kv")}
    assert kv_flags == {"--kv-cache-memory"}


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_version_and_log_level_after_the_subcommand() -> None:
    version = dgserve("--version")
    assert version.returncode == 0 and version.stdout.startswith("dgserve ")
    after = dgserve("generate", "--model", "tiny-random", "--prompt", "hi", "--max-tokens", "8", "--log-level",
                    "debug")
    assert after.returncode == 0, after.stderr
    assert "DEBUG " in after.stderr  # the level took effect
    assert "invalid choice: 'LOUD'" in dgserve("generate", "--prompt", "hi", "--log-level", "loud").stderr


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_train_writes_into_the_current_directory_by_default() -> None:
    from dgserve.deploy.cmd_train import TrainArgs
    from dgserve.train.paths import TINY_DIR

    out = Path(TrainArgs().out)
    assert not out.is_absolute() and TINY_DIR not in (Path.cwd() / out).parents and Path.cwd() / out != TINY_DIR
    assert "default ./dgserve-tiny" in dgserve("train", "--help").stdout


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_batch_rerun_with_nothing_left_is_quick_and_failed_rows_fail_the_exit_status(tmp_path) -> None:
    _jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}, "not json"])
    _jsonl(tmp_path / "out.jsonl", [{"id": 1, "text": "x", "finish_reason": "stop", "prompt_tokens": 1,
                                     "completion_tokens": 1}, {"id": 2, "text": "y", "finish_reason": "length",
                                                               "prompt_tokens": 1, "completion_tokens": 4}])
    proc = dgserve("batch", "--input", "in.jsonl", "--output", "out.jsonl", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Started a local Ray instance" not in proc.stderr  # nothing needed an engine: Ray never started
    assert "0 rows written to out.jsonl (2 were already there), 1 errors" in proc.stderr
    assert "dgserve batch: 1 of 3 rows failed; each is listed with its reason in out.jsonl.errors.jsonl" in \
        proc.stderr
    (error,) = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert error["id"] is None and error["error"].startswith("bad JSON")
    _jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}])
    clean = dgserve("batch", "--input", "in.jsonl", "--output", "out.jsonl", "--quiet", cwd=tmp_path)
    assert clean.returncode == 0 and "Started a local Ray instance" not in clean.stderr, clean.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_status_without_a_cluster_says_how_to_point_it_at_one(tmp_path) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8265)) == 0:
            pytest.skip("a Ray dashboard listens on this machine's default port")
    env = {"XDG_CACHE_HOME": str(tmp_path), "RAY_DASHBOARD_ADDRESS": ""}
    line = one_line_error(dgserve("status", env=env), "status")
    assert "no `dgserve run` is serving on this machine either" in line and "--address http://HEAD:8265" in line
