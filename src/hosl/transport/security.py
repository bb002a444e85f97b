"""Who may talk to a hosl server: a bearer token on every call, and TLS when configured.

The token comes from `--token-file PATH` or the `HOSL_TOKEN` environment variable, on both
commands. The client sends it as `authorization: Bearer <token>` metadata with every call; a
server interceptor checks it (in constant time) before any handler runs, refuses a missing or
wrong token with UNAUTHENTICATED and logs the peer. With a certificate and key the server listens
with TLS; the client then verifies it against `--tls-ca` (or the system roots).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from hosl.errors import ConfigError

TOKEN_ENV = "HOSL_TOKEN"
_HEADER = "authorization"


def load_token(token_file: str | None) -> str | None:
    """The bearer token: the file's content (whitespace stripped), else $HOSL_TOKEN, else None."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ConfigError(f"--token-file {path}: no such file")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"--token-file {path} is empty; write the shared token into it")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def call_metadata(token: str | None) -> list[tuple[str, str]]:
    return [(_HEADER, f"Bearer {token}")] if token else []


def _presented(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == _HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class TokenInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token on every call; a refused call never reaches a handler."""

    def __init__(self, token: str, log: logging.Logger) -> None:
        self._token = token.encode()
        self._log = log

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        presented = _presented(handler_call_details.invocation_metadata)
        if presented is not None and hmac.compare_digest(presented.encode(), self._token):
            return continuation(handler_call_details)
        reason = "no token" if presented is None else "a wrong token"
        method = handler_call_details.method

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            self._log.warning("refused %s from %s: %s", method, context.peer(), reason)
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"hosl server refused the call: {reason}; give the server's token with "
                f"--token-file or {TOKEN_ENV}",
            )

        # Every hosl call is a stream; refusing as a stream handler works for all of them.
        return grpc.stream_stream_rpc_method_handler(refuse)


def server_credentials(
    cert_file: str | None, key_file: str | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from a PEM certificate chain and key, or None for plain TCP."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", cert_file), ("--tls-key", key_file)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca_file: str | None, use_tls: bool) -> grpc.ChannelCredentials | None:
    """TLS credentials for the client: verify against `ca_file`, or the system roots."""
    if not use_tls and not ca_file:
        return None
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError(f"--tls-ca {ca_file}: no such file")
    return grpc.ssl_channel_credentials(Path(ca_file).read_bytes() if ca_file else None)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost", "[::1]")
