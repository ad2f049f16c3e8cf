"""Per-call server metrics: how long each method's calls took and which status they ended with.

Installed by `build_server` only with a meter provider (an exporter is configured, see
veil.services.common.telemetry). One histogram, `rpc.server.call.duration` (seconds), with the
OpenTelemetry RPC attributes: `rpc.system`, `rpc.service`, `rpc.method` and
`rpc.grpc.status_code` (the status the caller got, after error mapping); its count is the
number of calls. Health checks are not measured (probes would drown the real traffic). A
server-streaming call is measured when its stream ends.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import grpc
from opentelemetry.metrics import Histogram, MeterProvider

from veil.services.common.interceptors import Behavior, HandlerInterceptor
from veil.services.common.tracing import not_health_check

if TYPE_CHECKING:
    from veil.services.common.interceptors import Handler

CALL_DURATION = "rpc.server.call.duration"
#: OpenTelemetry's recommended boundaries for RPC durations, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class CallMetricsInterceptor(HandlerInterceptor):
    """Records every call's duration and final status in `rpc.server.call.duration`."""

    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter("veil.services.common.call_metrics")
        self._duration: Histogram = meter.create_histogram(
            CALL_DURATION,
            unit="s",
            description="Duration of calls this server answered, by method and status",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        if not not_health_check(handler_call_details):
            return continuation(handler_call_details)
        return super().intercept_service(continuation, handler_call_details)

    def wrap(self, behavior: Behavior, method: str) -> Behavior:
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        def measured(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                result = behavior(request, context)
            except BaseException:
                self._record(attributes, context, started, failed=True)
                raise
            if inspect.isgenerator(result):
                return self._measure_stream(result, attributes, context, started)
            self._record(attributes, context, started, failed=False)
            return result

        return measured

    def _measure_stream(
        self, items: Iterator[Any], attributes: dict[str, str], context: grpc.ServicerContext, started: float
    ) -> Iterator[Any]:
        failed = True
        try:
            yield from items
            failed = False
        finally:
            self._record(attributes, context, started, failed=failed)

    def _record(
        self, attributes: dict[str, str], context: grpc.ServicerContext, started: float, *, failed: bool
    ) -> None:
        # The status a handler or an inner interceptor set (abort, set_code); none set means OK,
        # unless the handler raised without one (gRPC answers UNKNOWN then).
        code = cast(Any, context).code()
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        self._duration.record(
            time.perf_counter() - started, {**attributes, "rpc.grpc.status_code": code.value[0]}
        )
