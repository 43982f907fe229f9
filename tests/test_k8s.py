"""deploy/k8s: every overlay renders (`kubectl kustomize`), validates against the Kubernetes schemas
(kubernetes-validate; the Istio resources against their own required fields), and says what the processes
really do: each probe names the port the container listens on and a health service its server registers,
each container's environment builds a valid config of its service, grace periods outlast the drains, the
router's DNS name is the workers' headless Service."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from adapter_store.config import StoreConfig
from adapter_store.service import SERVICE_NAME as STORE_SERVICE
from gpu_worker.config import WorkerConfig
from gpu_worker.service import SERVICE_NAME as WORKER_SERVICE
from router.config import RouterConfig
from router.service import SERVICE_NAME as ROUTER_SERVICE

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
OVERLAYS = ("cpu-demo", "gpu", "istio")
K8S_VERSION = "1.30"
# variables whose name is not LORASERVE_<SERVICE>_<FIELD> (gpu_worker.config.ENV_NAMES)
ALIASES = {"LORASERVE_WORKER_STORE_ADDRESS": "adapter_store"}
# container name -> (its service's health name, the config class its environment must build, the env prefix)
SERVICES = {"router": (ROUTER_SERVICE, RouterConfig, "LORASERVE_ROUTER_"),
            "worker": (WORKER_SERVICE, WorkerConfig, "LORASERVE_WORKER_"),
            "adapter-store": (STORE_SERVICE, StoreConfig, "LORASERVE_STORE_")}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the overlays (make setup installs it)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict]):
    for dep in of_kind(docs, "Deployment").values():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            yield dep, c


def environment(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's environment as the kubelet would give it (ConfigMap, Secret and field references
    resolved; $(VAR) expanded)."""
    maps, secrets = of_kind(docs, "ConfigMap"), of_kind(docs, "Secret")
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "secretRef" in ref:
            env.update(secrets[ref["secretRef"]["name"]].get("stringData", {}))
        else:
            env.update(maps[ref["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            value = var["value"]
            for name, v in env.items():
                value = value.replace(f"$({name})", v)
            env[var["name"]] = value
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]]["data"][ref["key"]]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
        else:  # fieldRef: the pod's IP or name
            env[var["name"]] = "10.0.0.7" if var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" else "pod-0"
    return env


def test_every_resource_validates_against_the_kubernetes_schemas(rendered):
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "PersistentVolumeClaim", "Namespace"} <= kinds
    for doc in docs:
        if doc["apiVersion"].endswith("istio.io/v1"):
            continue  # CRDs: checked in the Istio test
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_probes_name_the_real_ports_and_health_services(rendered):
    _, docs = rendered
    for dep, c in containers(docs):
        if c["name"] not in SERVICES:
            continue
        health_name, _, prefix = SERVICES[c["name"]]
        listening = int(environment(c, docs)[prefix + "PORT"])
        ports = {p["containerPort"] for p in c["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]["grpc"]
            assert probe["port"] == listening and listening in ports, (dep["metadata"]["name"], kind)
            # the servers register "" and their own service name (grpc.health.v1)
            assert probe.get("service", "") in ("", health_name), (dep["metadata"]["name"], kind)
        assert c["readinessProbe"]["grpc"]["service"] == health_name


def test_each_environment_builds_a_valid_config_of_its_service(rendered, tiny_model_dir, tmp_path):
    _, docs = rendered
    built = set()
    for _, c in containers(docs):
        if c["name"] in SERVICES:
            cls = SERVICES[c["name"]][1]
            env = environment(c, docs)
            # paths the pod's volumes would hold: a model directory here, so the worker's checks pass
            for var, path in (("LORASERVE_WORKER_MODEL_DIR", tiny_model_dir), ("LORASERVE_WORKER_LORA_ROOT", tmp_path)):
                if var in env:
                    env[var] = str(path)
            config = cls.from_args([], environ=env)  # exits 2 with the reason if a value is wrong
            prefix = SERVICES[c["name"]][2]
            names = {f.name for f in dataclasses.fields(cls)}
            for var in env:  # a misspelt variable would be ignored silently: each must name a field
                if var.startswith(prefix):
                    field = ALIASES.get(var, var[len(prefix):].lower())
                    assert field in names, f"{c['name']}: {var} is no setting of {cls.__name__}"
                    assert getattr(config, field) not in (None, "", ()), f"{var} did not reach the config"
            built.add(c["name"])
    assert built == set(SERVICES)


def test_grace_periods_outlast_the_drains(rendered):
    _, docs = rendered
    for dep, c in containers(docs):
        if c["name"] not in SERVICES:
            continue
        drain = float(environment(c, docs)[SERVICES[c["name"]][2] + "DRAIN_TIMEOUT_S"])
        pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + drain + 5, dep["metadata"]["name"]
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > drain, "liveness would kill a draining pod"


def test_the_router_finds_the_workers_by_their_headless_service(rendered):
    _, docs = rendered
    router = next(c for _, c in containers(docs) if c["name"] == "router")
    host, port = environment(router, docs)["LORASERVE_ROUTER_WORKERS_DNS"].split(":")
    service = of_kind(docs, "Service")[host]
    assert service["spec"]["clusterIP"] == "None" and [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    worker_pods = of_kind(docs, "Deployment")["loraserve-worker"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= worker_pods.items()
    assert of_kind(docs, "HorizontalPodAutoscaler")["loraserve-router"]["spec"]["minReplicas"] >= 2
    for pdb in of_kind(docs, "PodDisruptionBudget").values():
        selected = pdb["spec"]["selector"]["matchLabels"]
        assert any(selected.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in of_kind(docs, "Deployment").values()), pdb["metadata"]["name"]


def test_gpu_overlays_request_a_gpu_and_the_demo_builds_its_model():
    for overlay in ("gpu", "istio"):
        worker = of_kind(render(overlay), "Deployment")["loraserve-worker"]["spec"]["template"]["spec"]
        assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "loraserve-models", "readOnly": True}} \
            in worker["volumes"]
        # compiled kernels kept across container restarts, where Triton looks for them
        container = worker["containers"][0]
        cache = next(e["value"] for e in container["env"] if e["name"] == "TRITON_CACHE_DIR")
        assert {"name": "triton-cache", "mountPath": cache} in container["volumeMounts"]
        assert {"name": "triton-cache", "emptyDir": {}} in worker["volumes"]
    demo = of_kind(render("cpu-demo"), "Deployment")["loraserve-worker"]["spec"]["template"]["spec"]
    assert demo["initContainers"][0]["command"] == ["python", "-m", "stack.assets", "/models/demo"]
    assert "nvidia.com/gpu" not in str(demo["containers"][0]["resources"])


def test_the_istio_overlay_locks_admin_paths_and_keeps_streams():
    docs = render("istio")
    assert of_kind(docs, "Namespace")["loraserve"]["metadata"]["labels"]["istio-injection"] == "enabled"
    assert of_kind(docs, "PeerAuthentication")["default"]["spec"]["mtls"]["mode"] == "STRICT"
    policy = of_kind(docs, "AuthorizationPolicy")["loraserve-router-admin"]["spec"]
    paths = policy["rules"][0]["to"][0]["operation"]["paths"]
    assert policy["action"] == "DENY" and "/loraserve.v1.InferenceService/LoadAdapter" in paths
    assert f"/{ROUTER_SERVICE}/UnloadAdapter" in paths and "/v1/load_lora_adapter" in paths
    router_sa = of_kind(docs, "Deployment")["loraserve-router"]["spec"]["template"]["spec"]["serviceAccountName"]
    store_policy = of_kind(docs, "AuthorizationPolicy")["loraserve-store-admin"]["spec"]
    assert f"cluster.local/ns/loraserve/sa/{router_sa}" in store_policy["rules"][0]["from"][0]["source"][
        "notPrincipals"]
    assert router_sa in of_kind(docs, "ServiceAccount")
    worker_rule = of_kind(docs, "DestinationRule")["loraserve-worker"]["spec"]
    assert worker_rule["host"].startswith("loraserve-worker.loraserve.")
    pool = worker_rule["trafficPolicy"]["connectionPool"]["http"]
    assert pool["maxRequestsPerConnection"] == 0 and pool["http2MaxRequests"] >= 10000
    outlier = worker_rule["trafficPolicy"]["outlierDetection"]
    assert outlier["maxEjectionPercent"] <= 50 and outlier["consecutiveGatewayErrors"] == 0
