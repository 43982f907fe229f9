"""The server's lifecycle: health NOT_SERVING until warm, reflection, `python -m adapter_store` printing its
address and draining on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adapter_store import server as server_module
from adapter_store.server import StoreServer
from loraserve.v1 import adapter_store_pb2_grpc
from tests.child_env import child_env

from .conftest import resolve, store_config

REPO = Path(__file__).resolve().parents[2]
SERVICE = "loraserve.v1.AdapterStoreService"


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_not_serving_until_warm(store_loop, tmp_path, monkeypatch, adapters_root):
    release = threading.Event()
    build = server_module.build_store
    monkeypatch.setattr(server_module, "build_store", lambda cfg: release.wait(30) and build(cfg))
    server = StoreServer(store_config(tmp_path / "cache", lora_root=str(adapters_root)))
    starting = store_loop.submit(server.start())
    try:
        deadline = time.monotonic() + 10
        while not server.port and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert health_status(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(server.port, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch, pytest.raises(grpc.RpcError) as info:
            resolve(adapter_store_pb2_grpc.AdapterStoreServiceStub(ch), "sql-lora")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in info.value.details()
        release.set()
        starting.result(30)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health_status(server.port) == health_status(server.port, SERVICE) == serving
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            services = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for s in next(services).list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    finally:
        release.set()
        store_loop.run(server.shutdown(0))


def test_python_m_adapter_store_serves_then_drains_on_sigterm(tmp_path, adapters_root):
    env = child_env(LORASERVE_STORE_CACHE_DIR=str(tmp_path / "cache"), LORASERVE_STORE_LORA_ROOT=str(adapters_root))
    proc = subprocess.Popen([sys.executable, "-m", "adapter_store", "--port", "0", "--host", "127.0.0.1"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("adapter-store serving on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.rsplit(":", 1)[1])
        assert health_status(port) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert resolve(adapter_store_pb2_grpc.AdapterStoreServiceStub(ch), "sql-lora").ref.content_hash
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_configuration_exits_2_with_a_message(tmp_path):
    env = child_env(LORASERVE_STORE_ENABLE_ADMIN="true", LORASERVE_ADMIN_TOKEN="")
    out = subprocess.run([sys.executable, "-m", "adapter_store", "--cache-dir", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "LORASERVE_ADMIN_TOKEN is empty" in out.stderr
