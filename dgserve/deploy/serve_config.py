"""The Ray Serve config file that ``dgserve build`` writes and ``serve deploy`` / KubeRay's ``serveConfigV2`` accept.

One ``DeployConfig`` becomes one Serve application: ``import_path`` names ``app_builder`` and ``args`` carries the
whole config. ``dgserve build`` adds the ``deployments`` options that ``app_builder`` applies in code
(``dgserve.routing.app.deployment_options``), so operators see them where Serve looks; the Helm chart's
``serveConfigV2`` is the same application without them (Serve then takes them from ``app_builder``).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dgserve.config import DeployConfig


class ConfigFileError(ValueError):
    """A config file cannot be read or is invalid; the message names the file and the field."""


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding one mapping (JSON is read by the JSON parser for exact error positions)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ConfigFileError(f"{p}: is a directory, expected a YAML or JSON file") from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(f"{p}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigFileError(f"{p}: {where}not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigFileError(f"{p}: the file is {kind}; expected a mapping of settings")
    return data


def describe_validation_error(exc: ValidationError) -> str:
    """``field.path: message (got VALUE)`` for the first error, plus how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see DeployConfig in dgserve/config.py)"
    elif first["type"] != "missing" and "input" in first and not isinstance(first["input"], dict | list):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {msg}{more}"


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge like ``helm -f a.yaml -f b.yaml``: mappings merge, anything else (null included) replaces."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge_settings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_deploy_config(paths: str | Path | Sequence[str | Path]) -> DeployConfig:
    """Read a ``DeployConfig`` from one or more YAML/JSON files, merged in order. A file with a top-level
    ``dgserve:`` block (the Helm chart's values files) is read from that block, so
    ``--config helm/dgserve/values.yaml --config my-values.yaml`` gives what the chart renders."""
    files = [paths] if isinstance(paths, str | Path) else list(paths)
    data: dict[str, Any] = {}
    for path in files:
        one = read_mapping(path)
        if isinstance(one.get("dgserve"), dict):
            one = one["dgserve"]
        elif one and not set(one) & set(DeployConfig.model_fields):
            raise ConfigFileError(f"{path}: no DeployConfig fields ({', '.join(DeployConfig.model_fields)}) and no "
                                  "`dgserve:` block; is this the right file?")
        data = merge_settings(data, one)
    try:
        return DeployConfig.from_args(data)
    except ValidationError as exc:
        names = " + ".join(str(p) for p in files)
        raise ConfigFileError(f"{names}: {describe_validation_error(exc)}") from None


def build_serve_config(config: DeployConfig, *, with_options: bool = True) -> dict[str, Any]:
    """The Serve config (``ServeDeploySchema`` layout) for one dgserve application; ``with_options=False`` leaves
    out the ``deployments`` options (the Helm chart's form: Serve takes them from ``app_builder``)."""
    from dgserve.routing.app import APP_IMPORT_PATH, deployment_options

    app: dict[str, Any] = {"name": config.name, "route_prefix": config.route_prefix, "import_path": APP_IMPORT_PATH,
                           "args": config.serve_args()}
    if with_options:
        app["deployments"] = [{"name": name, **opts} for name, opts in deployment_options(config).items()]
    return {"http_options": {"host": config.http.host, "port": config.http.port}, "applications": [app]}


def validate_serve_config(data: dict[str, Any], source: str = "serve config") -> Any:
    """Parse with Ray's own ``ServeDeploySchema`` (what ``serve deploy`` and the dashboard accept)."""
    from ray.serve.schema import ServeDeploySchema

    try:  # on a copy: Ray's validators replace nested dicts (gang_scheduling_config) with objects in place
        return ServeDeploySchema.model_validate(copy.deepcopy(data))
    except ValidationError as exc:
        raise ConfigFileError(f"{source}: not a valid Ray Serve config: {describe_validation_error(exc)}") from None


def render(data: dict[str, Any], fmt: str = "yaml", header: str | None = None) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)
    return (f"# {header}\n" if header else "") + body


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    p = Path(path)
    if not p.parent.is_dir():
        raise ConfigFileError(f"{p}: cannot write: directory {p.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def deploy_config_json_schema() -> dict[str, Any]:
    """``DeployConfig``'s JSON schema for the Helm chart's ``values.schema.json`` (its ``$defs``, the root as
    ``$defs.DeployConfig``), without pydantic's titles and defaults: the chart's values.yaml holds the defaults."""
    schema = DeployConfig.model_json_schema()
    defs = schema.pop("$defs")
    defs["DeployConfig"] = schema

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if k not in ("title", "default")}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return {"$defs": clean(defs)}


def sync_helm_values_schema(path: str | Path) -> bool:
    """Rewrite the ``$defs`` of the chart's ``values.schema.json`` from ``DeployConfig``; True if it changed."""
    p = Path(path)
    current = json.loads(p.read_text())
    updated = {**current, **deploy_config_json_schema()}
    if updated == current:
        return False
    write_text_atomic(p, json.dumps(updated, indent=2) + "\n")
    return True
