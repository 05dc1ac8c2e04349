"""dgserve's Grafana dashboards, defined in code: overview, engine, experts.

They are plain dicts in Grafana's dashboard JSON model, built by a few small helpers here. We chose that over
Grafana's ``grafana-foundation-sdk`` builder because the JSON is the artefact everything consumes (the
HTTP API, ``--export``, the Helm chart's ConfigMap), three dashboards of ordinary panels do not need a
typed builder, and the SDK's Python package is versioned per Grafana release (epoch-prefixed versions)
with a preview API: a runtime dependency and its churn for what ``json.dumps`` already does.

Every query may name only metrics of ``dgserve.replicas.metrics.METRIC_NAMES`` (as Ray exports them);
``all_panel_queries`` lists the PromQL of every panel with Grafana variables substituted.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dgserve.replicas.metrics import exported_names

FOLDER_UID = "dgserve"
FOLDER_TITLE = "dgserve"
DATASOURCE_UID = "dgserve-prometheus"
DATASOURCE_NAME = "dgserve Prometheus"
SCHEMA_VERSION = 39

# What Grafana substitutes at query time; ``all_panel_queries`` uses these unless told otherwise.
DEFAULT_VARIABLES: dict[str, str] = {
    "model": ".*", "layer": ".*", "__rate_interval": "1m", "__interval": "15s", "__range": "1h",
}

_DS = {"type": "prometheus", "uid": "${datasource}"}
_SEL = 'model=~"$model"'


def m(name: str, suffix: str = "") -> str:
    """The exported series name of catalogue metric ``name`` (``suffix``: ``bucket``/``sum``/``count`` for a
    histogram); a ``KeyError`` for a name outside the catalogue, so a dashboard cannot query one."""
    names = exported_names(name)
    if not suffix:
        assert len(names) == 1, f"{name} is a histogram: say which series (bucket, sum, count)"
        return names[0]
    found = [n for n in names if n.endswith("_" + suffix)]
    assert found, f"{name} has no _{suffix} series"
    return found[0]


def rate(name: str, by: str = "", sel: str = _SEL, suffix: str = "", window: str = "$__rate_interval") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({m(name, suffix)}{{{sel}}}[{window}]))"


def quantile(q: float, name: str, sel: str = _SEL) -> str:
    return f"histogram_quantile({q}, {rate(name, by='le', sel=sel, suffix='bucket')})"


def mean_of(name: str, sel: str = _SEL) -> str:
    return f"{rate(name, sel=sel, suffix='sum')} / {rate(name, sel=sel, suffix='count')}"


def _target(expr: str, legend: str = "", ref: int = 0, fmt: str = "time_series", instant: bool = False) -> dict:
    return {"refId": chr(ord("A") + ref), "datasource": _DS, "expr": expr, "legendFormat": legend,
            "format": fmt, "instant": instant, "range": not instant}


class _Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping rows."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos


def _panel(layout: _Layout, kind: str, title: str, targets: list[tuple[str, str]], *, unit: str = "short",
           w: int = 12, h: int = 8, description: str = "", options: dict | None = None,
           fmt: str = "time_series", instant: bool = False, field_defaults: dict | None = None) -> dict:
    pid = layout.next_id
    layout.next_id += 1
    defaults: dict[str, Any] = {"unit": unit}
    defaults.update(field_defaults or {})
    return {
        "id": pid, "type": kind, "title": title, "description": description, "datasource": _DS,
        "gridPos": layout.place(w, h),
        "targets": [_target(expr, legend, i, fmt, instant) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }


def _timeseries(layout: _Layout, title: str, targets: list[tuple[str, str]], **kw: Any) -> dict:
    kw.setdefault("options", {"legend": {"displayMode": "list", "placement": "bottom"},
                              "tooltip": {"mode": "multi", "sort": "desc"}})
    return _panel(layout, "timeseries", title, targets, **kw)


def _stat(layout: _Layout, title: str, expr: str, *, unit: str = "short", w: int = 6, h: int = 4,
          description: str = "") -> dict:
    return _panel(layout, "stat", title, [(expr, "")], unit=unit, w=w, h=h, description=description,
                  options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "colorMode": "value", "graphMode": "area"})


def _heatmap(layout: _Layout, title: str, expr: str, legend: str, *, fmt: str, unit: str = "short",
             w: int = 24, h: int = 10, description: str = "") -> dict:
    return _panel(layout, "heatmap", title, [(expr, legend)], unit=unit, w=w, h=h, description=description,
                  fmt=fmt, options={"calculate": False, "cellGap": 1, "color": {"mode": "scheme",
                                    "scheme": "Oranges", "steps": 64}, "yAxis": {"axisPlacement": "left"},
                                    "rowsFrame": {"layout": "auto"}, "tooltip": {"mode": "single"},
                                    "legend": {"show": True}})


def _variables(extra: list[dict] | None = None) -> dict:
    model_q = f"label_values({m('dgserve_replica_up')}, model)"
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"name": "model", "label": "Model", "type": "query", "datasource": _DS,
         "query": {"query": model_q, "refId": "model"}, "definition": model_q, "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 1, "hide": 0},
    ]
    return {"list": variables + (extra or [])}


def _dashboard(uid: str, title: str, panels: list[dict], description: str,
               extra_vars: list[dict] | None = None) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["dgserve"], "timezone": "browser",
        "editable": True, "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1,
        "templating": _variables(extra_vars), "annotations": {"list": []}, "links": [
            {"type": "dashboards", "tags": ["dgserve"], "title": "dgserve", "asDropdown": True}],
        "panels": panels,
    }


def _or_zero(expr: str) -> str:
    # Ray exports a counter only after its first increment: show 0, not "No data", for rare events.
    return f"(({expr}) or vector(0))"


def overview() -> dict:
    L = _Layout()
    tok = rate("dgserve_generated_tokens")
    failed = rate("dgserve_requests", sel=f'{_SEL}, status!~"stop|length|cancelled"')
    panels = [
        _stat(L, "Replicas", f"sum({m('dgserve_replica_up')}{{{_SEL}}})",
              description="Model replicas (EP ranks count one each) that reported engine stats."),
        _stat(L, "Generated tokens/s", tok, unit="short"),
        _stat(L, "Requests/s", rate("dgserve_requests"), unit="reqps"),
        _stat(L, "Error ratio", f"{_or_zero(failed)} / {rate('dgserve_requests')}", unit="percentunit",
              description="Requests that ended in an engine error or were refused (429, 5xx), over all requests."),
        _timeseries(L, "Throughput", [(tok, "generated tokens/s"), (rate("dgserve_prompt_tokens"), "prompt tokens/s"),
                                      (rate("dgserve_canvases"), "canvases/s")],
                    unit="short", description="Tokens committed to clients; prompt tokens of finished requests."),
        _timeseries(L, "Requests by status", [(rate("dgserve_requests", by="status"), "{{status}}")], unit="reqps",
                    description="Finish reasons (stop, length, cancelled, error); HTTP status of refused requests."),
        _timeseries(L, "End-to-end latency", [
            (quantile(0.5, "dgserve_request_latency_seconds"), "p50"),
            (quantile(0.9, "dgserve_request_latency_seconds"), "p90"),
            (quantile(0.99, "dgserve_request_latency_seconds"), "p99")], unit="s"),
        _timeseries(L, "Time to first canvas", [
            (quantile(0.5, "dgserve_time_to_first_canvas_seconds"), "p50"),
            (quantile(0.9, "dgserve_time_to_first_canvas_seconds"), "p90"),
            (quantile(0.99, "dgserve_time_to_first_canvas_seconds"), "p99")], unit="s"),
        _timeseries(L, "Errors, 429s and failovers", [
            (_or_zero(rate("dgserve_requests", sel=f'{_SEL}, status="error"')), "engine errors/s"),
            (_or_zero(rate("dgserve_rejected_requests", by="status_code")), "rejected {{status_code}}/s"),
            (_or_zero(rate("dgserve_failovers")), "failovers/s")], unit="reqps"),
        _timeseries(L, "Replicas and utilization", [
            (f"sum({m('dgserve_replica_up')}{{{_SEL}}})", "replicas"),
            (f"sum({m('dgserve_throughput_tokens_per_s')}{{{_SEL}}}) / "
             f"sum({m('dgserve_capacity_tokens_per_s')}{{{_SEL}}})", "utilization (tokens/s / capacity)")],
            unit="short", description="The autoscaler aims utilization at its target (default 0.7)."),
    ]
    return _dashboard("dgserve-overview", "dgserve / Overview", panels,
                      "Throughput, latency, errors and replicas of dgserve deployments.")


def engine() -> dict:
    L = _Layout()
    per_replica = "{{replica}}"
    panels = [
        _timeseries(L, "Tokens per denoising forward", [
            (mean_of("dgserve_tokens_per_forward"), "mean"),
            (quantile(0.5, "dgserve_tokens_per_forward"), "p50"),
            (quantile(0.1, "dgserve_tokens_per_forward"), "p10")], unit="short",
            description="Committed new tokens per decoder forward, per request: the diffusion speed-up (AR = 1)."),
        _timeseries(L, "Steps per canvas", [
            (mean_of("dgserve_steps_per_canvas"), "mean"),
            (quantile(0.5, "dgserve_steps_per_canvas"), "p50"),
            (quantile(0.9, "dgserve_steps_per_canvas"), "p90")], unit="short",
            description="Denoising steps before adaptive stopping committed a canvas."),
        _heatmap(L, "Steps per canvas (distribution)", rate("dgserve_steps_per_canvas", by="le", suffix="bucket"),
                 "{{le}}", fmt="heatmap"),
        _timeseries(L, "Batch occupancy: canvases per forward", [
            (f"avg by (replica) ({m('dgserve_canvases_per_forward')}{{{_SEL}}})", per_replica)], unit="short"),
        _timeseries(L, "Tokens per engine forward", [
            (f"avg by (replica) ({m('dgserve_batch_tokens_per_forward')}{{{_SEL}}})", per_replica)], unit="short",
            description="Prefill + canvas + commit tokens processed per batched forward."),
        _timeseries(L, "Queue and running", [
            (f"sum({m('dgserve_queue_depth')}{{{_SEL}}})", "waiting requests"),
            (f"sum({m('dgserve_running_requests')}{{{_SEL}}})", "running requests"),
            (f"sum({m('dgserve_active_canvases')}{{{_SEL}}})", "active canvases")], unit="short"),
        _timeseries(L, "Engine forwards/s", [(rate("dgserve_forwards", by="replica"), per_replica)], unit="short"),
        _timeseries(L, "KV pages", [(f"sum by (state) ({m('dgserve_kv_pages')}{{{_SEL}}})", "{{state}}")],
                    unit="short", options={"legend": {"displayMode": "list", "placement": "bottom"},
                                           "tooltip": {"mode": "multi"}, "stacking": {"mode": "normal"}}),
        _timeseries(L, "KV cache usage", [
            (f'sum by (replica) ({m("dgserve_kv_pages")}{{{_SEL}, state="used"}}) / '
             f"sum by (replica) ({m('dgserve_kv_pages')}{{{_SEL}}})", per_replica)], unit="percentunit",
            field_defaults={"min": 0, "max": 1}),
        _timeseries(L, "KV cache memory", [
            (f"sum by (state) ({m('dgserve_kv_cache_bytes')}{{{_SEL}}})", "{{state}}")], unit="bytes"),
        _timeseries(L, "Image inputs", [
            (rate("dgserve_images"), "images/s"),
            (mean_of("dgserve_images_per_request"), "images per request (requests with images)")], unit="short"),
        _timeseries(L, "Vision encoder time per request", [
            (mean_of("dgserve_vision_encoder_seconds"), "mean"),
            (quantile(0.9, "dgserve_vision_encoder_seconds"), "p90")], unit="s",
            description="Vision tower time spent on a request's images (its share of the batched runs)."),
        _timeseries(L, "Prefix-cache hit rate", [
            (f"avg by (replica) ({m('dgserve_prefix_cache_hit_rate')}{{{_SEL}}})", per_replica)],
            unit="percentunit", field_defaults={"min": 0, "max": 1}),
        _timeseries(L, "Throughput vs capacity", [
            (f"sum by (replica) ({m('dgserve_throughput_tokens_per_s')}{{{_SEL}}})", "{{replica}} tokens/s"),
            (f"sum by (replica) ({m('dgserve_capacity_tokens_per_s')}{{{_SEL}}})", "{{replica}} capacity")],
            unit="short", w=24, description="What each replica reports to the autoscaler."),
    ]
    return _dashboard("dgserve-engine", "dgserve / Engine", panels,
                      "Diffusion engine internals: tokens per forward, steps per canvas, batching, KV cache.")


def experts() -> dict:
    L = _Layout()
    sel = f'{_SEL}, layer=~"$layer"'
    per_expert = rate("dgserve_expert_tokens", by="expert", sel=sel)
    per_layer_expert = rate("dgserve_expert_tokens", by="layer, expert", sel=sel)
    layer_q = f'label_values({m("dgserve_expert_tokens")}{{{_SEL}}}, layer)'
    layer_var = {"name": "layer", "label": "MoE layer", "type": "query", "datasource": _DS,
                 "query": {"query": layer_q, "refId": "layer"}, "definition": layer_q, "refresh": 2,
                 "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 3,
                 "hide": 0}
    panels = [
        _heatmap(L, "Per-expert load (tokens/s)", per_expert, "{{expert}}", fmt="time_series",
                 description="Tokens routed to each expert, summed over the selected layers and all ranks."),
        _timeseries(L, "EP rank imbalance", [
            (f"max by (replica) ({m('dgserve_expert_rank_imbalance')}{{{_SEL}}})", "{{replica}}")], unit="short",
            description="max over ranks / mean over ranks of routed tokens (1 = balanced)."),
        _timeseries(L, "Hottest expert / mean, per layer", [
            (f"max by (layer) ({per_layer_expert}) / avg by (layer) ({per_layer_expert})", "layer {{layer}}")],
            unit="short", description="How far the busiest expert of each layer is above its layer's mean."),
        _panel(L, "bargauge", "Expert load share over the time range", [
            (f"sum by (expert) (increase({m('dgserve_expert_tokens')}{{{sel}}}[$__range])) / "
             f"scalar(sum(increase({m('dgserve_expert_tokens')}{{{sel}}}[$__range])))", "{{expert}}")],
            unit="percentunit", w=24, h=10, instant=True,
            options={"orientation": "vertical", "displayMode": "gradient", "showUnfilled": True,
                     "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}),
    ]
    return _dashboard("dgserve-experts", "dgserve / Experts", panels,
                      "Mixture-of-experts routing load per expert and expert-parallel rank balance.",
                      extra_vars=[layer_var])


def dashboards() -> dict[str, dict]:
    """uid -> dashboard JSON model."""
    return {d["uid"]: d for d in (overview(), engine(), experts())}


def with_datasource(dashboard: dict, uid: str, name: str) -> dict:
    """A copy whose ``datasource`` variable defaults to the given Prometheus data source."""
    d = copy.deepcopy(dashboard)
    for v in d["templating"]["list"]:
        if v["name"] == "datasource":
            v["current"] = {"selected": True, "text": name, "value": uid}
    return d


def export(directory: str | Path) -> list[Path]:
    """Write each dashboard as ``<uid>.json`` (Grafana's import/provisioning format); returns the files."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, d in dashboards().items():
        p = out / f"{uid}.json"
        p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Queries, for checks
# --------------------------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables (``$name``, ``${name}``, ``${name:fmt}``) by ``variables`` values; unknown
    ones stay as they are."""
    return _VAR.sub(lambda mo: variables.get(mo.group(1) or mo.group(2), mo.group(0)), expr)


def iter_panel_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, raw PromQL) of every panel target, nested row panels included."""
    stack = list(dashboard.get("panels", []))
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p["title"], t["expr"]


def variable_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """The ``label_values(...)`` queries of the dashboard's query variables."""
    out = []
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def all_panel_queries(variables: Mapping[str, str] | None = None) -> list[str]:
    """Every panel's PromQL across the dashboards, with Grafana variables substituted: ``variables`` over
    ``DEFAULT_VARIABLES`` (``model``/``layer`` match everything, ``$__rate_interval`` is 1m, ...)."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}
    return [substitute(expr, values) for d in dashboards().values() for _, expr in iter_panel_queries(d)]
