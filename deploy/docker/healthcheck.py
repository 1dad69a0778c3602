"""Container healthcheck of a maw service: exit 0 when grpc.health.v1 on ADDRESS says SERVING.

``python /app/healthcheck.py 127.0.0.1:50051 [SERVICE]``: the compose healthcheck of each service
(Kubernetes has native ``grpc:`` probes and needs no script). Exits 1 with one line on stderr when
the server is unreachable, slow (3 s deadline) or not SERVING, e.g. while PostgreSQL is down.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

USAGE = "usage: healthcheck.py HOST:PORT [SERVICE]"


def check(address: str, service: str = "", timeout: float = 3.0) -> str | None:
    """None when ``service`` at ``address`` is SERVING, else why not."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        return f"{address}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str]) -> int:
    """Entry point: the exit status the container runtime reads."""
    if not 1 <= len(argv) <= 2:
        sys.stderr.write(USAGE + "\n")
        return 2
    problem = check(argv[0], argv[1] if len(argv) == 2 else "")
    if problem:
        sys.stderr.write(problem + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
