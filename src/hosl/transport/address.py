"""Host and port checks for both commands, done before gRPC sees an address.

gRPC takes a port modulo 2^16 (`--port 70000` listens on 4464, `-1` on 65535) and reports every
bind failure the same way, so hosl checks ranges itself and, when a bind fails, finds out why
with an ordinary socket to say so in one line.
"""

from __future__ import annotations

import errno
import socket

from hosl.errors import ConfigError

MAX_PORT = 65535


def check_port(port: int, flag: str, *, allow_any: bool = False) -> int:
    """`port` if it is 1..65535 (or 0 with `allow_any`: the system picks a free one)."""
    low = 0 if allow_any else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= MAX_PORT:
        extra = " (0: any free port)" if allow_any else ""
        raise ConfigError(f"{flag} {port}: a port must be {low}..{MAX_PORT}{extra}")
    return port


def split_address(address: str, flag: str = "--server") -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port), with the port range-checked."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{flag} {address}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{flag} {address}: write an IPv6 address in brackets, [::1]:50051")
    port = int(port_text)
    if not 1 <= port <= MAX_PORT:
        raise ConfigError(f"{flag} {address}: the port must be 1..{MAX_PORT}")
    return host, port


def resolve_host(host: str, flag: str = "--host") -> None:
    """Raise a one-line ConfigError if `host` is neither an address nor a name that resolves."""
    try:
        socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(
            f"{flag} {host}: not an address or a name that resolves ({err})"
        ) from None


def bind_problem(host: str, port: int) -> str:
    """Why a listening socket on host:port cannot be opened, in words ("" if it can now)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        return f"{host} does not resolve ({err})"
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as gRPC does: a port left in TIME_WAIT by an earlier server is free to listen on
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} is already in use (another hosl serve?)"
            if err.errno == errno.EACCES:
                return f"permission denied for port {port} (ports below 1024 need privileges)"
            if err.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return err.strerror or str(err)
    return ""
