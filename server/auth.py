"""Bearer-token authentication: every RPC except grpc.health.v1 needs `authorization: Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str, on_reject: Callable[[str, str], None] | None = None) -> None:
        self._token = token.encode()
        self._on_reject = on_reject

    def _ok(self, details: grpc.HandlerCallDetails) -> tuple[bool, str]:
        values = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
        if not values:
            return False, "missing authorization metadata: send 'authorization: Bearer <token>'"
        value = values[0] if isinstance(values[0], str) else bytes(values[0]).decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if len(values) == 1 and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                                   self._token):
            return True, ""
        return False, "invalid bearer token"

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        ok, why = self._ok(details)
        if ok:
            return handler
        method = details.method

        def deny(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            if self._on_reject is not None:  # here, not above: only the handler knows the peer
                self._on_reject(method, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        def deny_stream(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            deny(request_or_iterator, context)
            yield  # pragma: no cover - makes this a generator, as streaming handlers are

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)
