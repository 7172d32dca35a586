"""The Grafana dashboards of the chart (files/dashboards/*.json), written from this one description.

Queries use only metric names the services export (iex_<service>_<thing>_<unit>, Triton's nv_*)
and, named in EXTERNAL_METRICS, the GPU families that only a GPU node exports; the integration
test tests/integration/test_dashboards.py checks every name against the running stack's /metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Families that the local stack's Triton cannot list because it has no GPU: the official image
# exports them on a GPU node (--allow-gpu-metrics). The dashboard test accepts exactly these
# besides what the running stack exposes.
EXTERNAL_METRICS: dict[str, str] = {
    "nv_gpu_utilization": "Triton, on a GPU",
    "nv_gpu_memory_used_bytes": "Triton, on a GPU",
    "nv_gpu_memory_total_bytes": "Triton, on a GPU",
}

CONSUMERS = ("planner", "crawler", "dedup", "scorer", "trainer")
SERVICES = (*CONSUMERS, "search")
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass
class Target:
    expr: str
    legend: str = ""
    format: str = "time_series"


@dataclass
class Panel:
    title: str
    targets: list[Target]
    kind: str = "timeseries"
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    stack: bool = False
    content: str = ""  # text panels


def per_service(template: str, legend: str, services=CONSUMERS) -> list[Target]:
    """One target per service, for the families every service has under its own prefix."""
    return [Target(template.format(s=s), legend.format(s=s)) for s in services]


def quantiles(metric: str, by: str = "", qs=(0.5, 0.95), selector: str = NS, window: str = RATE) -> list[Target]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        Target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{window}])))", f"p{int(q * 100)}{suffix}")
        for q in qs
    ]


def text_panel(title: str, content: str, width: int = 12, height: int = 8) -> Panel:
    return Panel(title, [], kind="text", width=width, height=height, content=content)


# ---- the four dashboards ---------------------------------------------------------------------


def exploration_progress() -> tuple[str, str, list[Panel]]:
    panels = [
        Panel("Running explorations", [Target(f'sum(iex_planner_explorations{{{NS}, state="running"}})')], kind="stat", width=6, height=4),
        Panel(
            "Iterations finished (time range)",
            [Target(f"sum(increase(iex_planner_iterations_finished_total{{{NS}}}[$__range]))")],
            kind="stat",
            width=6,
            height=4,
        ),
        Panel(
            "Images stored (time range)",
            [Target(f"sum(increase(iex_dedup_objects_stored_total{{{NS}}}[$__range]))")],
            kind="stat",
            width=6,
            height=4,
        ),
        Panel(
            "k-NN top-1 of the latest version",
            [Target(f"max(iex_trainer_eval_knn_top1_ratio{{{NS}}})")],
            kind="stat",
            unit="percentunit",
            width=6,
            height=4,
            description="Accuracy of a k-NN classifier on the target's labelled split (labels are used only for evaluation).",
        ),
        Panel("Explorations by state", [Target(f"sum by (state) (iex_planner_explorations{{{NS}}})", "{{state}}")], stack=True),
        Panel(
            "Iterations finished per hour",
            [Target(f"sum by (outcome) (increase(iex_planner_iterations_finished_total{{{NS}}}[1h]))", "{{outcome}}")],
            description="complete: every query's images arrived; deadline: the iteration moved on with what arrived.",
        ),
        Panel(
            "Through the loop (per second)",
            [
                Target(f"sum(rate(iex_planner_queries_issued_total{{{NS}}}[{RATE}]))", "queries issued"),
                Target(f'sum(rate(iex_crawler_urls_total{{{NS}, status="ok"}}[{RATE}]))', "images fetched"),
                Target(f"sum(rate(iex_dedup_objects_stored_total{{{NS}}}[{RATE}]))", "images stored (new)"),
                Target(f'sum(rate(iex_scorer_images_scored_total{{{NS}, source="event"}}[{RATE}]))', "images scored"),
            ],
            unit="ops",
            width=24,
        ),
        Panel(
            "Dedup decisions by kind",
            [Target(f"sum by (kind) (rate(iex_dedup_decisions_total{{{NS}}}[{RATE}]))", "{{kind}}")],
            unit="ops",
            stack=True,
        ),
        Panel(
            "Trained encoder versions per hour",
            [Target(f"sum by (kind) (increase(iex_trainer_iterations_trained_total{{{NS}}}[1h]))", "{{kind}}")],
        ),
        Panel(
            "Image reward distribution",
            [Target(f"sum by (le) (increase(iex_scorer_image_reward_bucket{{{NS}}}[{RATE}]))", "{{le}}", format="heatmap")],
            kind="heatmap",
            description="Mean cosine similarity of each scored image to its k nearest target images.",
        ),
        Panel(
            "Concept reward distribution",
            [Target(f"sum by (le) (increase(iex_planner_concept_reward_bucket{{{NS}}}[{RATE}]))", "{{le}}", format="heatmap")],
            kind="heatmap",
            description="Concept reward = mean of the top-10 image rewards of its query.",
        ),
        Panel(
            "Concept reward quantiles",
            quantiles("iex_planner_concept_reward", qs=(0.5, 0.9, 0.99), window="30m"),
        ),
        Panel("Iteration collect time", quantiles("iex_planner_iteration_collect_duration_seconds", window="1h"), unit="s"),
        Panel(
            "Planning step (posterior, sampling, descriptors)",
            [
                *quantiles("iex_planner_planning_duration_seconds", by="reward_model", qs=(0.95,), window="1h"),
                Target(f"sum(iex_planner_explorations_waiting_for_vocabulary{{{NS}}})", "waiting for vocabulary embeddings"),
                Target(f"sum(increase(iex_planner_descriptor_fallbacks_total{{{NS}}}[1h]))", "LLM descriptor fallbacks per hour"),
            ],
        ),
        text_panel(
            "Top concepts",
            "Concept names are not metric labels (the vocabulary has ~146k of them, an unbounded label set). "
            "Ask the planner:\n\n"
            "```\niex explore top-concepts <exploration id>\n"
            "grpcurl -plaintext -d '{\"exploration_id\": \"<id>\", \"limit\": 20}' localhost:50051 iex.v1.PlannerService/TopConcepts\n```",
            width=24,
            height=5,
        ),
    ]
    return "iex-exploration", "Internet Explorer / Exploration progress", panels


def pipeline_health() -> tuple[str, str, list[Panel]]:
    panels = [
        Panel(
            "Crawler error ratio",
            [
                Target(
                    f'sum(rate(iex_crawler_urls_total{{{NS}, status!="ok"}}[{RATE}])) / sum(rate(iex_crawler_urls_total{{{NS}}}[{RATE}]))'
                )
            ],
            kind="stat",
            unit="percentunit",
            width=6,
            height=4,
        ),
        Panel(
            "Consumer lag (records)",
            [Target(f'sum({{__name__=~"iex_({"|".join(CONSUMERS)})_kafka_consumer_lag_messages", {NS}}})')],
            kind="stat",
            width=6,
            height=4,
        ),
        Panel(
            "Dead-lettered (time range)",
            [Target(f'sum(increase({{__name__=~"iex_({"|".join(CONSUMERS)})_kafka_dead_lettered_total", {NS}}}[$__range]))')],
            kind="stat",
            width=6,
            height=4,
        ),
        Panel(
            "Services ready",
            [Target(f'sum({{__name__=~"iex_({"|".join(SERVICES)})_ready", {NS}}})')],
            kind="stat",
            width=6,
            height=4,
            description="Replicas whose grpc.health.v1 status is SERVING (every dependency reachable).",
        ),
        Panel(
            "Consumed per topic (events/s)",
            per_service(f"sum by (topic) (rate(iex_{{s}}_kafka_consumed_total{{{{{NS}}}}}[{RATE}]))", "{{{{topic}}}} → {s}"),
            unit="ops",
        ),
        Panel(
            "Produced per topic (events/s)",
            per_service(f"sum by (topic) (rate(iex_{{s}}_kafka_produced_total{{{{{NS}}}}}[{RATE}]))", "{s} → {{{{topic}}}}"),
            unit="ops",
        ),
        Panel(
            "Consumer lag per topic (records)",
            per_service(f"sum by (topic) (iex_{{s}}_kafka_consumer_lag_messages{{{{{NS}}}}})", "{{{{topic}}}} ({s})"),
        ),
        Panel(
            "Handling time p95 per topic",
            per_service(
                f"histogram_quantile(0.95, sum by (le, topic) (rate(iex_{{s}}_kafka_handle_duration_seconds_bucket{{{{{NS}}}}}[{RATE}])))",
                "{{{{topic}}}} ({s})",
            ),
            unit="s",
        ),
        Panel(
            "Handler errors by kind (before retry)",
            per_service(f"sum by (topic, kind) (rate(iex_{{s}}_kafka_handler_errors_total{{{{{NS}}}}}[{RATE}]))", "{{{{topic}}}} {{{{kind}}}} ({s})"),
            unit="ops",
        ),
        Panel(
            "Dead-lettered by reason",
            per_service(
                f"sum by (topic, reason) (increase(iex_{{s}}_kafka_dead_lettered_total{{{{{NS}}}}}[{RATE}]))", "{{{{topic}}}} {{{{reason}}}} ({s})"
            ),
        ),
        Panel(
            "Crawler refusals by reason",
            [Target(f'sum by (status) (rate(iex_crawler_urls_total{{{NS}, status!="ok"}}[{RATE}]))', "{{status}}")],
            unit="ops",
            stack=True,
        ),
        Panel(
            "Search requests by back end and outcome",
            [Target(f"sum by (backend, outcome) (rate(iex_crawler_search_requests_total{{{NS}}}[{RATE}]))", "{{backend}} {{outcome}}")],
            unit="ops",
        ),
        Panel("Crawler fetch time", quantiles("iex_crawler_fetch_duration_seconds", by="outcome"), unit="s"),
        Panel(
            "Crawler downloads in flight and bytes",
            [
                Target(f"sum(iex_crawler_fetches_in_flight{{{NS}}})", "in flight"),
                Target(f"sum(rate(iex_crawler_downloaded_bytes_total{{{NS}}}[{RATE}]))", "bytes/s"),
            ],
        ),
        Panel("Dedup decision time", quantiles("iex_dedup_decision_duration_seconds", by="kind", qs=(0.95,)), unit="s"),
        Panel(
            "Search queries (offline web)",
            [Target(f"sum by (interface, outcome) (rate(iex_search_queries_total{{{NS}}}[{RATE}]))", "{{interface}} {{outcome}}")],
            unit="ops",
        ),
        Panel(
            "Dependencies up",
            per_service(f"min by (dependency) (iex_{{s}}_dependency_up{{{{{NS}}}}})", "{{{{dependency}}}} ({s})", services=SERVICES),
            description="1 when the dependency answered the service's last readiness check.",
        ),
        Panel(
            "Planner API requests by method and code",
            [Target(f"sum by (method, code) (rate(iex_planner_grpc_requests_total{{{NS}}}[{RATE}]))", "{{method}} {{code}}")],
            unit="reqps",
        ),
    ]
    return "iex-pipeline", "Internet Explorer / Pipeline health", panels


def gpu_trainer() -> tuple[str, str, list[Panel]]:
    panels = [
        Panel("Training throughput", [Target(f"sum(iex_trainer_train_throughput_images_per_second{{{NS}}})", "images/s")], unit="short"),
        Panel("MoCo loss", [Target(f"avg(iex_trainer_train_loss{{{NS}}})", "loss")]),
        Panel(
            "Learning rate and key-encoder momentum",
            [
                Target(f"avg(iex_trainer_train_learning_rate{{{NS}}})", "learning rate"),
                Target(f"avg(iex_trainer_train_momentum{{{NS}}})", "momentum"),
            ],
        ),
        Panel("Step time", quantiles("iex_trainer_train_step_duration_seconds"), unit="s"),
        Panel(
            "GPU utilisation",
            [
                Target(f"max by (instance) (iex_trainer_gpu_utilization_ratio{{{NS}}})", "trainer {{instance}}"),
                Target(f"avg by (gpu_uuid) (nv_gpu_utilization{{{NS}}})", "Triton GPU {{gpu_uuid}}"),
            ],
            unit="percentunit",
            description="The trainer's GPU busy share (NVML) and Triton's view of its GPU; on one node with "
            "time-slicing both lines describe the same device. Zero on CPU.",
        ),
        Panel(
            "GPU memory",
            [
                Target(f"max by (instance) (iex_trainer_gpu_memory_allocated_bytes{{{NS}}})", "trainer allocated {{instance}}"),
                Target(f"max by (instance) (iex_trainer_gpu_memory_peak_bytes{{{NS}}})", "trainer peak {{instance}}"),
                Target(f"avg by (gpu_uuid) (nv_gpu_memory_used_bytes{{{NS}}})", "Triton GPU {{gpu_uuid}}"),
            ],
            unit="bytes",
        ),
        Panel(
            "Data loading",
            [
                *quantiles("iex_trainer_train_data_wait_seconds", qs=(0.95,)),
                Target(f"sum(rate(iex_trainer_loader_images_read_total{{{NS}}}[{RATE}]))", "images read/s"),
                Target(f"sum(rate(iex_trainer_loader_cache_hits_total{{{NS}}}[{RATE}]))", "cache hits/s"),
            ],
            description="p95: time a step waited for its batch; above zero, the GPU starves on S3 reads or decoding.",
        ),
        Panel("Ranks training together", [Target(f"max(iex_trainer_train_world_size{{{NS}}})", "world size")], kind="stat", width=6, height=8),
        Panel(
            "Checkpoints written",
            [Target(f"sum by (kind) (increase(iex_trainer_checkpoints_written_total{{{NS}}}[1h]))", "{{kind}} per hour")],
            width=6,
        ),
        Panel(
            "Encoder versions per hour",
            [Target(f"sum by (kind) (increase(iex_trainer_iterations_trained_total{{{NS}}}[1h]))", "{{kind}}")],
        ),
        Panel("Time to produce a version", quantiles("iex_trainer_train_run_duration_seconds", window="2h"), unit="s"),
        Panel(
            "Training set and steps",
            [
                Target(f"sum(iex_trainer_train_set_images{{{NS}}})", "images in the last training set"),
                Target(f"sum(rate(iex_trainer_train_steps_total{{{NS}}}[{RATE}]))", "steps/s"),
            ],
        ),
        Panel(
            "Busy and device",
            [
                Target(f"max(iex_trainer_busy{{{NS}}})", "busy"),
                Target(f"max by (device) (iex_trainer_device_info{{{NS}}})", "device {{device}}"),
            ],
        ),
        Panel(
            "Evaluation of the latest version",
            [
                Target(f"max(iex_trainer_eval_knn_top1_ratio{{{NS}}})", "k-NN top-1"),
                Target(f"max(iex_trainer_eval_linear_probe_top1_ratio{{{NS}}})", "linear probe top-1"),
            ],
            unit="percentunit",
        ),
        Panel(
            "Images skipped by reason",
            [Target(f"sum by (reason) (increase(iex_trainer_images_skipped_total{{{NS}}}[{RATE}]))", "{{reason}}")],
        ),
    ]
    return "iex-trainer", "Internet Explorer / GPU trainer", panels


def triton() -> tuple[str, str, list[Panel]]:
    success = f"sum by (model) (rate(nv_inference_request_success{{{NS}}}[{RATE}]))"
    panels = [
        Panel(
            "Inference requests",
            [
                Target(success, "{{model}} ok"),
                Target(f"sum by (model) (rate(nv_inference_request_failure{{{NS}}}[{RATE}]))", "{{model}} failed"),
            ],
            unit="reqps",
        ),
        Panel(
            "Request latency (server side, mean)",
            [
                Target(f"sum by (model) (rate(nv_inference_request_duration_us{{{NS}}}[{RATE}])) / {success} / 1e6", "{{model}} total"),
                Target(f"sum by (model) (rate(nv_inference_queue_duration_us{{{NS}}}[{RATE}])) / {success} / 1e6", "{{model}} queue"),
                Target(f"sum by (model) (rate(nv_inference_compute_infer_duration_us{{{NS}}}[{RATE}])) / {success} / 1e6", "{{model}} compute"),
            ],
            unit="s",
        ),
        Panel(
            "Batch size (images per execution)",
            [
                Target(
                    f"sum by (model) (rate(nv_inference_count{{{NS}}}[{RATE}])) / sum by (model) (rate(nv_inference_exec_count{{{NS}}}[{RATE}]))",
                    "{{model}} (dynamic batcher)",
                ),
                *quantiles("iex_scorer_inference_batch_images", by="purpose", qs=(0.5,)),
            ],
            description="Triton's executions versus the scorer's requests: above the scorer's batch, the dynamic batcher merges requests.",
        ),
        Panel("Scorer → Triton latency", quantiles("iex_scorer_inference_duration_seconds", by="purpose"), unit="s"),
        Panel(
            "Model loads and failures",
            [
                Target(f"sum(increase(iex_scorer_model_loads_total{{{NS}}}[{RATE}]))", "versions switched to"),
                Target(f"sum by (reason) (increase(iex_scorer_model_load_failures_total{{{NS}}}[{RATE}]))", "failed: {{reason}}"),
            ],
        ),
        Panel(
            "Serving",
            [
                Target(f"max(iex_scorer_model_loaded_version{{{NS}}})", "latest version switched to"),
                Target(f"sum(iex_scorer_explorations_serving{{{NS}}})", "explorations served"),
            ],
        ),
        Panel("Model switch time (load + target bank)", quantiles("iex_scorer_model_switch_duration_seconds", qs=(0.5, 0.95), window="1h"), unit="s"),
        Panel(
            "Embedding cache hit ratio",
            [
                Target(
                    f'sum(rate(iex_scorer_embedding_cache_lookups_total{{{NS}, result="hit"}}[{RATE}])) '
                    f"/ sum(rate(iex_scorer_embedding_cache_lookups_total{{{NS}}}[{RATE}]))",
                    "hit ratio",
                )
            ],
            unit="percentunit",
        ),
        Panel(
            "GPU utilisation and memory",
            [
                Target(f"avg by (gpu_uuid) (nv_gpu_utilization{{{NS}}})", "utilisation {{gpu_uuid}}"),
                Target(
                    f"avg by (gpu_uuid) (nv_gpu_memory_used_bytes{{{NS}}}) / avg by (gpu_uuid) (nv_gpu_memory_total_bytes{{{NS}}})",
                    "memory {{gpu_uuid}}",
                ),
            ],
            unit="percentunit",
        ),
        Panel(
            "Triton CPU",
            [
                Target(f"avg(nv_cpu_utilization{{{NS}}})", "CPU utilisation"),
                Target(f"avg(nv_cpu_memory_used_bytes{{{NS}}}) / avg(nv_cpu_memory_total_bytes{{{NS}}})", "memory"),
            ],
            unit="percentunit",
        ),
    ]
    return "iex-triton", "Internet Explorer / Triton", panels


DASHBOARDS = {
    "exploration-progress": exploration_progress,
    "pipeline-health": pipeline_health,
    "gpu-trainer": gpu_trainer,
    "triton": triton,
}


# ---- Grafana JSON -----------------------------------------------------------------------------


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
    }
    if panel.description:
        base["description"] = panel.description
    if panel.kind == "text":
        base["options"] = {"mode": "markdown", "content": panel.content}
        return base
    base["datasource"] = DATASOURCE
    base["targets"] = [
        {
            "datasource": DATASOURCE,
            "refId": chr(ord("A") + i),
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "format": t.format,
            "range": True,
        }
        for i, t in enumerate(panel.targets)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
        base["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif panel.kind == "stat":
        base["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"}
    elif panel.kind == "heatmap":
        base["options"] = {"calculate": False, "yAxis": {"unit": panel.unit}, "color": {"scheme": "Spectral", "mode": "scheme"}}
    base["fieldConfig"] = {"defaults": defaults, "overrides": []}
    return base


def render(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    """A Grafana dashboard model (schemaVersion 39), panels laid out left to right, top to bottom."""
    laid_out, x, y, row_height = [], 0, 0, 0
    for number, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        laid_out.append(_panel_json(panel, number, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": uid,
        "title": title,
        "tags": ["internet-explorer"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [{"title": "Internet Explorer", "type": "dashboards", "tags": ["internet-explorer"], "asDropdown": True}],
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(iex_build_info, namespace)", "refId": "namespace"},
                    "definition": "label_values(iex_build_info, namespace)",
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "refresh": 2,
                    "current": {},
                    "hide": 0,
                },
            ]
        },
        "panels": laid_out,
    }


# What Grafana puts in for its built-in and the dashboards' own variables, so that a query can be
# run on Prometheus as Grafana would run it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m", "$namespace": ".*"}


def substitute_variables(expr: str) -> str:
    """`expr` with GRAFANA_VARIABLES filled in."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def rendered_queries(directory) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable of the dashboards rendered in `directory`."""
    from pathlib import Path

    queries = []
    for path in sorted(Path(directory).glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                queries.append((f"{path.name}: {panel['title']}", target["expr"]))
        for variable in board["templating"]["list"]:
            if variable.get("type") == "query":
                queries.append((f"{path.name}: variable {variable['name']}", variable["definition"].removeprefix("label_values(").split(",")[0]))
    return queries


def build_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    out = {}
    for name, build in DASHBOARDS.items():
        uid, title, panels = build()
        out[f"{name}.json"] = json.dumps(render(uid, title, panels), indent=2, ensure_ascii=False) + "\n"
    return out
