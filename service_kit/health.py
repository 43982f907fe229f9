"""The gRPC health and reflection every service exposes: grpcio's health servicer with one status for the server
as a whole ("") and for the service by name, and reflection over the service and health.

    health = ServiceHealth("loraserve.v1.WorkerService")
    await health.expose(server)        # before server.start(): NOT_SERVING, so probes get an answer while loading
    await health.set(SERVING)          # once ready
    await health.enter_graceful_shutdown()   # NOT_SERVING for good, Watch streams told so
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceHealth:
    def __init__(self, service_name: str):
        self.service_name = service_name
        self.servicer = health.aio.HealthServicer()

    async def expose(self, server: grpc.aio.Server) -> None:
        """Health (NOT_SERVING) and reflection on `server`, not started yet."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        await self.set(NOT_SERVING)
        reflection.enable_server_reflection((self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    async def set(self, status: int) -> None:
        """The server's and the service's status."""
        for name in ("", self.service_name):
            await self.servicer.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()
