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
import ssl
from collections.abc import Callable, Collection
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
        try:
            token = path.read_bytes().decode("ascii").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"--token-file {path}: {_TOKEN_RULE}") from None
        if not token:
            raise ConfigError(f"--token-file {path} is empty; write the shared token into it")
        return check_token(token, f"--token-file {path}")
    token = os.environ.get(TOKEN_ENV, "").strip()
    return check_token(token, TOKEN_ENV) if token else None


# gRPC metadata values are printable ASCII: a server that accepted any other token could never be
# reached, as no client can send it.
_TOKEN_RULE = "a token must be printable ASCII on one line (e.g. secrets.token_hex(32))"


def check_token(token: str, source: str) -> str:
    if not all(" " <= ch <= "~" for ch in token):
        raise ConfigError(f"{source}: {_TOKEN_RULE}")
    return token


def call_metadata(token: str | None) -> list[tuple[str, str]]:
    return [(_HEADER, f"Bearer {token}")] if token else []


def presented_token(metadata: Any) -> str | None:
    """The bearer token a call presented (its invocation metadata), or None."""
    return _presented(metadata)


def load_client_tokens(path_text: str) -> dict[int, str]:
    """`--client-tokens FILE`: one `ID TOKEN` per line (ID a client id >= 0; `#` starts a
    comment), each client's own token. A client must then present its own id with its own token."""
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"--client-tokens {path}: no such file")
    tokens: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ConfigError(f"--client-tokens {path} line {number}: write `ID TOKEN`, e.g. `0 "
                              "3f9a...` (one client per line)")
        cid = int(parts[0])
        token = check_token(parts[1], f"--client-tokens {path} line {number}")
        if cid in tokens or token in tokens.values():
            raise ConfigError(f"--client-tokens {path} line {number}: client ids and tokens must "
                              "each appear once")
        tokens[cid] = token
    if not tokens:
        raise ConfigError(f"--client-tokens {path} names no client; write `ID TOKEN` lines")
    return tokens


def token_matches(presented: str | None, token: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


def _presented(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == _HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class TokenInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token on every call; a refused call never reaches a handler. With
    per-client tokens any of them passes here; the session then binds the token to its id."""

    def __init__(self, token: str | Collection[str], log: logging.Logger) -> None:
        tokens = [token] if isinstance(token, str) else list(token)
        self._tokens = [t.encode() for t in tokens]
        self._log = log

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        presented = _presented(handler_call_details.invocation_metadata)
        # every token is compared, so the time taken does not tell which one came close
        if presented is not None and sum(
            hmac.compare_digest(presented.encode(), token) for token in self._tokens
        ):
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
    _check_pair(cert_file, key_file)
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    return grpc.ssl_server_credentials([pair])


def _check_pair(cert_file: str, key_file: str) -> None:
    """gRPC reports a bad certificate or key only as a failed bind; say what is wrong instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as err:
        reason = err.reason or str(err)
        if "KEY_VALUES_MISMATCH" in reason:
            what = "the key does not belong to the certificate"
        else:
            what = f"not a PEM certificate chain and its private key ({reason})"
        raise ConfigError(f"--tls-cert {cert_file} / --tls-key {key_file}: {what}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tls-cert {cert_file} / --tls-key {key_file}: {err}") from None


def channel_credentials(ca_file: str | None, use_tls: bool) -> grpc.ChannelCredentials | None:
    """TLS credentials for the client: verify against `ca_file`, or the system roots."""
    if not use_tls and not ca_file:
        return None
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError(f"--tls-ca {ca_file}: no such file")
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, ValueError) as err:
            raise ConfigError(f"--tls-ca {ca_file}: not a PEM certificate ({err})") from None
    return grpc.ssl_channel_credentials(Path(ca_file).read_bytes() if ca_file else None)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost", "[::1]")
