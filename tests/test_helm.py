"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk bundles Helm v4): core objects
validate with kubernetes-validate (strict), the RayService against KubeRay's CRD schema with unknown fields
rejected, and serveConfigV2 is exactly what `dgserve build` writes for the same settings."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (bundles Helm v4)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
jsonschema = pytest.importorskip("jsonschema")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from dgserve.config import DeployConfig  # noqa: E402
from dgserve.deploy.serve_config import (  # noqa: E402
    build_serve_config,
    deploy_config_json_schema,
    load_deploy_config,
    merge_settings,
)

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "dgserve"
DGX = CHART / "examples" / "dgx-values.yaml"
KUBE_VERSION = "1.30.0"
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")

# (name, values files, extra values) rendered by the tests below
VARIANTS = {
    "default": ([], {}),
    "dgx": ([DGX], {}),
    "dgx+batch": ([DGX], {"batchJob": {"enabled": True}}),
    "fixed-replicas+extras": ([], {
        "dgserve": {"replicas": {"autoscaling": None, "num_replicas": 3, "ep_size": 2}, "model": {"served_name": None},
                    "ingress": {"request_timeout_s": None}, "auth": {"api_keys_file": "/etc/dgserve/api-keys/keys"}},
        "apiKeys": {"create": True, "keys": ["alice:sk-alice-0123456789", "bob:sk-bob-0123456789ab"]},
        "modelWeights": {"source": "initContainer",
                         "initContainer": {"command": ["sh", "-c", "cp -r /src/model /models/"]}},
        "ingress": {"enabled": True}, "podMonitor": {"enabled": True},
        "networkPolicy": {"serveFrom": [{"podSelector": {"matchLabels": {"role": "client"}}}]},
    }),
    "hostpath-no-netpol": ([], {"modelWeights": {"source": "hostPath"}, "networkPolicy": {"enabled": False},
                                "tests": {"enabled": False}}),
}


def _values(files: list[Path], extra: dict) -> dict:
    """User values as `helm -f a -f b --set ...` would layer them (without the chart's defaults)."""
    out: dict = {}
    for f in files:
        out = merge_settings(out, yaml.safe_load(f.read_text()))
    return merge_settings(out, extra)


def _render(values: dict, chart: Path = CHART) -> dict[str, str]:
    return helm.Chart.load(str(chart)).render(values, name="dg", namespace="ml", is_install=True)


def _objects(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: _objects(_render(_values(files, extra))) for name, (files, extra) in VARIANTS.items()}


# KubeRay's RayService CRD lives beside the repository (../shared/k8s), read in place: it is not ours to copy
SHARED_CRD = REPO.parent / "shared" / "k8s" / "ray.io_rayservices.yaml"


@functools.cache
def _crd_schema() -> dict:
    """The RayService v1 schema of KubeRay's CRD."""
    if not SHARED_CRD.is_file():
        pytest.skip(f"KubeRay's CRD ({SHARED_CRD}, i.e. ../shared/k8s beside the repository) is not on this machine")
    crd = yaml.safe_load(SHARED_CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@functools.cache
def _validator(part: str = "") -> jsonschema.Draft7Validator:
    """A validator for the closed CRD schema (or its ``rayClusterConfig`` part), built once."""
    schema = _crd_schema()
    if part:
        schema = schema["properties"]["spec"]["properties"][part]
    return jsonschema.Draft7Validator(_closed(schema))


def _closed(schema):
    """The CRD schema with `additionalProperties: false` wherever it lists properties, so that unknown fields
    fail validation as the API server's pruning would silently drop them."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


# -- lint --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "dgx", "dgx+batch", "fixed-replicas+extras"])
def test_lint_is_clean(name):
    files, extra = VARIANTS[name]
    report = helm.lint(str(CHART), _values(files, extra), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error (1 is info)
    assert not problems and not report["errors"], report


# -- every object ------------------------------------------------------------------------------------------------

def _embedded_pods(doc: dict) -> list[dict]:
    """The pod templates inside a RayService/RayJob, as Pods (core objects in all but name)."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    templates += [spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else []
    return [{"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(t), "metadata": {**t["metadata"], "name": f"pod-{i}"}}
            for i, t in enumerate(templates)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_core_objects_validate_strictly(rendered, name):
    core = [d for d in rendered[name] if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    for ray in (d for d in rendered[name] if d["kind"] in ("RayService", "RayJob")):
        core += _embedded_pods(ray)
    assert len(core) >= 2
    for doc in core:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rayservice_validates_against_the_kuberay_crd(rendered, name):
    (svc,) = [d for d in rendered[name] if d["kind"] == "RayService"]
    assert svc["apiVersion"] == "ray.io/v1"
    _validator().validate(svc)
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # no model replica on the head
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and group["minReplicas"] <= group["maxReplicas"]


def test_unknown_fields_are_rejected_by_the_closed_crd_schema(rendered):
    (svc,) = [d for d in rendered["default"] if d["kind"] == "RayService"]
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(jsonschema.ValidationError, match="volumeMount"):
        _validator().validate(bad)
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoScaling"):
        _validator().validate(bad)


def test_rayjob_cluster_spec_validates_against_the_crd_cluster_schema(rendered):
    (job,) = [d for d in rendered["dgx+batch"] if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    # no copy of the RayJob CRD is at hand: its own fields are checked against KubeRay v1's RayJobSpec by name
    assert set(job["spec"]) <= {"entrypoint", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                                "activeDeadlineSeconds", "submitterPodTemplate", "rayClusterSpec", "runtimeEnvYAML",
                                "submissionMode", "backoffLimit", "entrypointNumCpus", "entrypointNumGpus"}
    _validator("rayClusterConfig").validate(job["spec"]["rayClusterSpec"])
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["dgserve", "batch", "--address", "auto"]
    assert entry[entry.index("--max-workers") + 1] == "32" and entry[entry.index("--worker-gpus") + 1] == "1"


def test_ray_containers_run_non_root_with_a_read_only_root(rendered):
    for name, docs in rendered.items():
        for d in docs:
            if d["kind"] not in ("RayService", "RayJob"):
                continue
            cluster = d["spec"].get("rayClusterConfig") or d["spec"]["rayClusterSpec"]
            pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
            for pod in pods:
                assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
                volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
                for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                    assert c["securityContext"]["readOnlyRootFilesystem"] is True, (name, c["name"])
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False
                    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                    assert tmp and "emptyDir" in volumes[tmp[0]["name"]], (name, c["name"])  # Ray's /tmp/ray
                    assert c["resources"]["requests"] and c["resources"]["limits"]
            assert cluster["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True


def test_api_keys_secret_is_mounted_where_the_config_points(rendered):
    docs = rendered["fixed-replicas+extras"]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["stringData"]["keys"].split() == ["alice:sk-alice-0123456789", "bob:sk-bob-0123456789ab"]
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
    assert args["auth"]["api_keys_file"] == mount["mountPath"] + "/keys"
    assert head["initContainers"][0]["command"] == ["sh", "-c", "cp -r /src/model /models/"]


def test_chart_refuses_inconsistent_settings():
    with pytest.raises(helm.HelmError, match=re.escape("set dgserve.auth.api_keys_file to that path")):
        _render({"apiKeys": {"existingSecret": "keys"}})
    with pytest.raises(helm.HelmError, match=re.escape("must be under modelWeights.mountPath")):
        _render({"dgserve": {"model": {"path": "/elsewhere/m"}}})
    with pytest.raises(helm.HelmError, match="bogus"):  # values.schema.json: DeployConfig forbids unknown fields
        _render({"dgserve": {"model": {"bogus": 1}}})
    with pytest.raises(helm.HelmError, match="dtype"):
        _render({"dgserve": {"model": {"dtype": "float8"}}})


# -- serveConfigV2 == dgserve build ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_serve_config_equals_dgserve_build(rendered, tmp_path, name):
    files, extra = VARIANTS[name]
    (svc,) = [d for d in rendered[name] if d["kind"] == "RayService"]
    from_helm = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(from_helm)
    # the same settings through dgserve build: the chart's values.yaml, then the user's files, then --set
    extra_file = tmp_path / "extra.yaml"
    extra_file.write_text(yaml.safe_dump({"dgserve": extra.get("dgserve", {})}))
    config = load_deploy_config([CHART / "values.yaml", *files, extra_file])
    # the chart leaves the deployments' options to app_builder (the same function dgserve build writes them with)
    assert from_helm == build_serve_config(config, with_options=False)
    assert "deployments" not in from_helm["applications"][0]


def test_values_yaml_lists_every_deploy_config_field():
    block = yaml.safe_load((CHART / "values.yaml").read_text())["dgserve"]

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k != "autoscaling":
                out |= keys(v, prefix + k + ".")
        return out

    expected = keys(DeployConfig().serve_args())
    assert keys(block) >= expected, f"helm/dgserve/values.yaml lacks {sorted(expected - keys(block))}"
    assert keys(block) <= expected | {"replicas.autoscaling"}, sorted(keys(block) - expected)


def test_values_schema_matches_deploy_config():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["dgserve"]["$ref"] == "#/$defs/DeployConfig"
    assert schema["$defs"] == deploy_config_json_schema()["$defs"], (
        "values.schema.json is out of date with DeployConfig; run: python -c 'from dgserve.deploy.serve_config "
        "import sync_helm_values_schema; sync_helm_values_schema(\"helm/dgserve/values.schema.json\")'")


# -- Grafana dashboards ------------------------------------------------------------------------------------------

def test_dashboards_configmap_packs_the_exported_dashboards(tmp_path):
    dashboards = pytest.importorskip("dgserve.deploy.dashboards", reason="dgserve dashboards is not written yet")
    chart = tmp_path / "dgserve"
    shutil.copytree(CHART, chart)
    written = dashboards.export(chart / "dashboards")
    assert written
    docs = _objects(_render({}, chart))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")]
    kubernetes_validate.validate(cm, KUBE_VERSION, strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(cm["data"]) == sorted(p.name for p in written)
    for name, text in cm["data"].items():
        assert json.loads(text) == json.loads((chart / "dashboards" / name).read_text())
    # without exported files there is no ConfigMap, and NOTES.txt says how to add them
    plain = _render({})
    assert not any(d["kind"] == "ConfigMap" for d in _objects(plain))
    assert "dgserve dashboards --export" in plain["dgserve/templates/NOTES.txt"]
