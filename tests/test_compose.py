"""docker-compose.yml and deploy/healthcheck.py, checked for real (no Docker engine needed)."""

import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"

ONE_SHOT = {"s3-init"}
LONG_RUNNING = {"redis", "s3", "adapter-store", "gpu-worker", "router"}
GRPC_PORTS = {"router": 50051, "adapter-store": 50052, "gpu-worker": 50053}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
SECRET_KEY = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


# --- docker-compose.yml ------------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) if it works, else `docker-compose` (v1.29, Debian 12)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid():
    cli = compose_cli()
    if cli is None:
        pytest.fail(
            "no compose validator: neither `docker compose` nor `docker-compose` works; "
            "run `make setup` (installs Debian's docker-compose)"
        )
    res = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, f"{' '.join(cli)} config -q failed:\n{res.stdout}{res.stderr}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def with_defaults(value: str) -> str:
    """Interpolate as compose would with an empty environment: ${VAR:-default} -> default."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def test_compose_spec_format(compose):
    assert "version" not in compose, "compose-spec format: no top-level `version:` key"
    assert {"adapter-cache", "hf-cache", "triton-cache"} <= set(compose.get("volumes") or {})


def test_every_needed_service_exists(services):
    assert set(services) >= LONG_RUNNING | ONE_SHOT, sorted(services)


def test_long_running_services_have_healthchecks(services):
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", f"{name} is one-shot: restart must be 'no'"
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_depends_on_references_existing_services(services):
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition")
            assert condition in CONDITIONS, f"{name} -> {dep}: bad condition {condition}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits on {dep}'s healthcheck"
            if condition == "service_completed_successfully":
                assert dep in ONE_SHOT, f"{name} waits for long-running {dep} to exit"


def test_grpc_services_use_the_probe_on_their_port(services):
    assert HEALTHCHECK.is_file()
    for name, port in GRPC_PORTS.items():
        svc = services[name]
        assert svc["healthcheck"]["test"][1:] == ["python", "deploy/healthcheck.py", f"localhost:{port}"]
        assert any(with_defaults(p).endswith(f":{port}") for p in svc["ports"]), name
        # the gRPC port is LORASERVE_<SERVICE>_PORT (the router's HTTP API, LORASERVE_ROUTER_HTTP_PORT, is another)
        ports = [v for k, v in env_of(svc).items() if re.fullmatch(r"LORASERVE_[A-Z]+_PORT", k)]
        assert ports == [str(port)], f"{name} listens on {ports}, probed on {port}"


def test_gpu_worker_reserves_an_nvidia_gpu_and_mounts_the_model(services):
    worker = services["gpu-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    model_mounts = [v for v in worker["volumes"] if v.split(":")[-2:] == ["/models/base", "ro"]]
    assert model_mounts and model_mounts[0].startswith("${LORASERVE_MODEL_DIR:-"), model_mounts
    # compiled kernels kept across restarts, where Triton looks for them
    assert f"triton-cache:{env_of(worker)['TRITON_CACHE_DIR']}" in worker["volumes"]


def test_no_hard_coded_secrets(services):
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if SECRET_KEY.search(key):
                assert isinstance(value, str) and INTERPOLATION.fullmatch(value), (
                    f"{name}: {key} must come from the environment (${{VAR:-...}}), not {value!r}"
                )
    admin = [
        env_of(s)["LORASERVE_ADMIN_TOKEN"] for s in services.values() if "LORASERVE_ADMIN_TOKEN" in env_of(s)
    ]
    assert admin and all(with_defaults(v) == "" for v in admin), "admin token default must be empty"


def test_published_ports_do_not_collide(services):
    seen: dict[str, str] = {}
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            host_port = with_defaults(port).split(":")[-2]  # [ip:]host:container
            assert host_port not in seen, f"{name} and {seen[host_port]} both publish {host_port}"
            seen[host_port] = name


# --- deploy/healthcheck.py ---------------------------------------------------------------------


def probe(address: str, *service: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), address, *service],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_probe_serving_exits_0(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    res = probe(address)
    assert res.returncode == 0, res.stderr


def test_probe_not_serving_exits_1(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe(address).returncode == 1


def test_probe_named_service(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.set("loraserve.v1.InferenceService", health_pb2.HealthCheckResponse.SERVING)
    assert probe(address, "loraserve.v1.InferenceService").returncode == 0
    assert probe(address, "no.such.Service").returncode == 1  # NOT_FOUND


def test_probe_no_server_exits_1():
    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe(f"127.0.0.1:{port}").returncode == 1


def test_probe_gives_up_after_3_seconds():
    release = threading.Event()

    class Hanging(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            release.wait(30)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Hanging(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        start = time.monotonic()
        res = probe(f"127.0.0.1:{port}")
        assert res.returncode == 1 and "DEADLINE_EXCEEDED" in res.stderr
        assert time.monotonic() - start < 10
    finally:
        release.set()
        server.stop(None)


def test_probe_usage_error_exits_1():
    assert probe("a:1", "svc", "extra").returncode == 1


def test_the_router_serves_its_http_api_on_the_published_port(services):
    router = services["router"]
    assert env_of(router)["LORASERVE_ROUTER_HTTP_PORT"] == "8000"
    assert any(with_defaults(p).endswith(":8000") for p in router["ports"])
