"""`hosl serve` and `hosl client` refuse bad ports, shared ports, bad values, tokens and TLS files
with one line that says what is wrong, and a failed `serve` start writes nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from hosl.cli import main
from hosl.transport.address import bind_problem
from hosl.transport.framing import grpc_options
from test_grpc_processes import _env
from test_grpc_transport import _self_signed


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one error line of a refused command (exit status 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hosl: error: "), err
    return lines[0]


def _serve_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["serve", "--model", str(model), "--split-layer", "1", "--output", str(out), *extra]


def _client_args(model: Path, files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        "client",
        "--model",
        str(model),
        "--task",
        "sst2",
        "--train-file",
        str(files[0]),
        "--eval-file",
        str(files[1]),
        "--split-layer",
        "1",
        "--output",
        str(out),
        *extra,
    ]


@pytest.fixture
def served_port() -> int:
    """A port a gRPC server with hosl's server options listens on, for the test's duration."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1), options=grpc_options(server=True)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0).wait()


def test_a_second_server_cannot_share_a_port(served_port) -> None:
    second = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1), options=grpc_options(server=True)
    )
    try:
        bound = second.add_insecure_port(f"127.0.0.1:{served_port}")
    except RuntimeError:
        bound = 0
    second.stop(0)
    assert bound == 0, "gRPC let a second server share the port (SO_REUSEPORT)"
    assert "already in use" in bind_problem("127.0.0.1", served_port)


def test_serve_on_a_served_port_is_one_line_and_writes_nothing(
    tiny_model_dir, tmp_path, capsys, served_port
) -> None:
    out = tmp_path / "server"
    line = _error(capsys, _serve_args(tiny_model_dir, out, "--port", str(served_port)))
    assert f"port {served_port} is already in use" in line
    assert not out.exists()


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_serve_refuses_a_port_out_of_range(tiny_model_dir, tmp_path, capsys, port) -> None:
    line = _error(capsys, _serve_args(tiny_model_dir, tmp_path / "s", "--port", port))
    assert f"--port {port}: a port must be 0..65535" in line


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "::1:5"])
def test_client_refuses_an_address_out_of_range(
    tiny_model_dir, sentiment_files, tmp_path, capsys, address
) -> None:
    out = tmp_path / "c"
    line = _error(capsys, _client_args(tiny_model_dir, sentiment_files, out, "--server", address))
    assert f"--server {address}" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--max-frame-mb", "0", "--max-frame-mb 0: must be 1.."),
        ("--max-frame-mb", "-5", "--max-frame-mb -5: must be 1.."),
        ("--idle-timeout", "0", "--idle-timeout 0.0: must be a positive"),
        ("--idle-timeout", "nan", "--idle-timeout nan: must be a positive"),
    ],
)
def test_serve_refuses_bad_values(tiny_model_dir, tmp_path, capsys, flag, value, message) -> None:
    assert message in _error(capsys, _serve_args(tiny_model_dir, tmp_path / "s", flag, value))


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--reconnect-timeout", "-5", "--reconnect-timeout -5.0: must be 0 or more"),
        ("--step-timeout", "0", "--step-timeout 0.0: must be more than 0"),
        ("--step-timeout", "inf", "--step-timeout inf: must be more than 0"),
    ],
)
def test_client_refuses_bad_values(
    tiny_model_dir, sentiment_files, tmp_path, capsys, flag, value, message
) -> None:
    argv = _client_args(
        tiny_model_dir, sentiment_files, tmp_path / "c", "--server", "127.0.0.1:5", flag, value
    )
    assert message in _error(capsys, argv)


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe caf\xe9", "caf\u00e9-token".encode(), b"two\nlines", b"tab\tinside"],
    ids=["not utf-8", "non-ascii", "newline", "tab"],
)
def test_an_unusable_token_is_refused_on_both_sides(
    tiny_model_dir, sentiment_files, tmp_path, capsys, content
) -> None:
    token = tmp_path / "token"
    token.write_bytes(content)
    serve = _serve_args(tiny_model_dir, tmp_path / "s", "--token-file", str(token))
    assert "a token must be printable ASCII on one line" in _error(capsys, serve)
    client = _client_args(
        tiny_model_dir,
        sentiment_files,
        tmp_path / "c",
        "--server",
        "127.0.0.1:5",
        "--token-file",
        str(token),
    )
    assert "a token must be printable ASCII on one line" in _error(capsys, client)


def test_serve_output_that_is_a_file(tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    assert "is a file; give a directory" in _error(capsys, _serve_args(tiny_model_dir, out))


def test_bad_tls_files_and_hosts_say_what_is_wrong(tiny_model_dir, tmp_path, capsys) -> None:
    cert, key = _self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = _self_signed(other)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    token = tmp_path / "token"
    token.write_text("t0ken")
    out = tmp_path / "s"
    cases = {
        ("--tls-cert", cert, "--tls-key", other_key): "the key does not belong to the certificate",
        ("--tls-cert", str(garbage), "--tls-key", key): "not a PEM certificate chain",
        ("--host", "no-such-host.invalid", "--token-file", str(token)): "not an address or a name",
        ("--host", "256.1.1.1", "--token-file", str(token)): "not an address or a name",
    }
    for extra, message in cases.items():
        line = _error(capsys, _serve_args(tiny_model_dir, out, *extra))
        assert message in line and "port in use" not in line, line
    assert not out.exists()


def test_a_failed_serve_start_prints_one_line_without_grpc_logs(tiny_model_dir, tmp_path) -> None:
    """In a fresh process gRPC's C core would log its own lines before hosl's; --verbose only."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = tmp_path / "s"
        args = _serve_args(tiny_model_dir, out, "--port", str(port))[1:]
        done = subprocess.run(
            [sys.executable, "-m", "hosl.cli", "serve", *args],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"hosl: error: cannot listen on 127.0.0.1:{port}: port {port} is already in use "
        "(another hosl serve?)"
    ]
    assert not out.exists()


def test_a_client_says_it_is_waiting_for_a_closed_port(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = _client_args(
        tiny_model_dir,
        sentiment_files,
        tmp_path / "c",
        "--server",
        f"127.0.0.1:{port}",
        "--reconnect-timeout",
        "1",
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"hosl: waiting up to 1 s for the server at 127.0.0.1:{port}")
    assert err[-1].startswith(
        f"hosl: error: cannot reach the hosl server at 127.0.0.1:{port} "
        "after 1 s (--reconnect-timeout)"
    )
    assert len(err) == 2
