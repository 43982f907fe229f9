"""gRPC health probe for container healthchecks (grpc.health.v1).

Usage: python deploy/healthcheck.py HOST:PORT [SERVICE]

Exits 0 only when the server (or SERVICE, if given) reports SERVING; 1 on any other status,
an error, an unreachable server, or the 3 s deadline. (Docker reserves exit code 2, so a usage
error also exits 1.)
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 1
    address, service = argv[0], (argv[1] if len(argv) == 2 else "")
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
    except grpc.RpcError as err:
        print(f"{address} {service!r}: {err.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
