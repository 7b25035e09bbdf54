"""Bearer-token authentication: every RPC except grpc.health.v1 needs `authorization: Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenInterceptor(grpc.ServerInterceptor):
    """`tokens`: one token (anonymous: every holder is the same user) or {token: name} from --tokens-file (each
    name an identity of its own; `identify` tells the servicer whose call it is)."""

    def __init__(self, tokens: str | dict[str, str], on_reject: Callable[[str, str], None] | None = None) -> None:
        named = {tokens: ""} if isinstance(tokens, str) else dict(tokens)
        self._tokens = [(t.encode(), name) for t, name in named.items()]
        self._on_reject = on_reject

    def _match(self, token: bytes) -> str | None:
        """The token's name ('' when anonymous), None when it is none of ours. Compares with every token in
        constant time, so the answer's timing does not tell which (or how much of one) matched."""
        found: str | None = None
        for known, name in self._tokens:
            if hmac.compare_digest(token, known):
                found = name
        return found

    def _bearer(self, metadata: Any) -> tuple[bytes | None, str]:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return None, "missing authorization metadata: send 'authorization: Bearer <token>'"
        value = values[0] if isinstance(values[0], str) else bytes(values[0]).decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if len(values) != 1 or scheme.lower() != "bearer":
            return None, "invalid bearer token"
        return token.strip().encode(), ""

    def _ok(self, details: grpc.HandlerCallDetails) -> tuple[bool, str]:
        token, why = self._bearer(details.invocation_metadata)
        if token is None:
            return False, why
        if self._match(token) is None:
            return False, "invalid bearer token"
        return True, ""

    def identify(self, context: grpc.ServicerContext) -> str | None:
        """The name of the caller's token (None for an anonymous token or none)."""
        token, _ = self._bearer(context.invocation_metadata())
        name = self._match(token) if token is not None else None
        return name or None

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
