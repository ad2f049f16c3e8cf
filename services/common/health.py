"""grpc.health.v1 with List: the library's servicer answers Check and Watch but leaves List
unimplemented (an ERROR traceback per `grpcurl ... grpc.health.v1.Health/List`)."""

from __future__ import annotations

import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class ListingHealthServicer(health.HealthServicer):
    """The library's servicer, plus List over every service name a status was set for."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._names_lock = threading.Lock()
        self._names = {""}

    def set(self, service: str, status: Any) -> None:
        super().set(service, status)
        with self._names_lock:
            self._names.add(service)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Every known service's status (its request has no fields)."""
        with self._names_lock:
            names = sorted(self._names)
        # Check is the library's own answer (graceful shutdown included), one name at a time.
        statuses = {name: self.Check(health_pb2.HealthCheckRequest(service=name), context) for name in names}
        # types-grpcio-health-checking predates List and its messages.
        return health_pb2.HealthListResponse(statuses=statuses)  # type: ignore[attr-defined]
