"""Memory a peer can make `hosl serve` hold: the server process's RSS, and its peak (VmHWM),
measured before and after streams of chunks sent before any hello, and after a valid hello."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoConfig

from hosl.remote import run_fingerprint
from hosl.transport.codec import CodecError, encode
from hosl.transport.framing import MORE, ByteBudget, Reassembler, grpc_options
from hosl.transport.grpc_server import FULL_METHOD
from hosl.transport.handshake import identity_for
from test_grpc_processes import server
from test_grpc_transport import _cfg

MIB = 1 << 20


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


def _attack(port: int, total: int, chunk_mib: int, first: bytes | None = None) -> None:
    """One stream: optionally a (hello) frame, then `total` bytes of chunks of one frame that
    never ends, in gRPC messages of `chunk_mib` (hosl's own are 1 MiB; an attacker's, any)."""
    chunk = bytes([MORE]) + bytes(chunk_mib * MIB)

    def messages() -> Iterator[bytes]:
        if first is not None:
            yield b"\0" + first
        for _ in range(total // (chunk_mib * MIB)):
            yield chunk

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options()) as channel:
        call = channel.stream_stream(FULL_METHOD)(messages(), timeout=120)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ), err.value


def _hello(model_dir: Path) -> bytes:
    cfg = _cfg("hosl")
    identity = identity_for(
        str(model_dir), AutoConfig.from_pretrained(model_dir), 1, "hosl", "float32", 1
    )
    run = run_fingerprint(cfg)
    return encode(
        "hello", {"identity": identity.to_json(), "wire_dtype": "float32", "run": run}, {}
    )


def test_chunk_streams_cannot_pin_server_memory(tiny_model_dir, tmp_path) -> None:
    with server(tiny_model_dir, tmp_path / "server") as (proc, port):
        before = _memory(proc.pid)
        # four parallel streams of 512 MiB of chunks, none with a hello
        streams = [
            threading.Thread(target=_attack, args=(port, 512 * MIB, size)) for size in (1, 16) * 2
        ]
        for thread in streams:
            thread.start()
        for thread in streams:
            thread.join(180)
        # one stream of 1.1 GiB of chunks after a valid hello
        _attack(port, 1126 * MIB, 1, first=_hello(tiny_model_dir))
        after = _memory(proc.pid)
        assert proc.poll() is None
    log = (tmp_path / "server" / "server.log").read_text()
    assert "connected at step 0" in log and "exceeds the limit" in log
    print(
        f"server RSS {before['VmRSS']} -> {after['VmRSS']} MiB, "
        f"peak {before['VmHWM']} -> {after['VmHWM']} MiB"
    )
    assert after["VmHWM"] - before["VmHWM"] < 200, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 100, (before, after)


def test_partial_frames_across_connections_share_one_cap() -> None:
    budget = ByteBudget(3 * MIB)
    first, second = Reassembler(8 * MIB, budget), Reassembler(8 * MIB, budget)
    chunk = bytes([MORE]) + bytes(MIB)
    first.feed(chunk)
    first.feed(chunk)
    second.feed(chunk)
    with pytest.raises(CodecError, match="buffering"):
        second.feed(chunk)  # 4 MiB held across the two: over the cap
    assert budget.used == 2 * MIB and not second.in_frame  # the refused one gave its bytes back
    first.reset()  # as when a stream is refused or vanishes
    assert budget.used == 0
    second.feed(chunk)
    assert budget.used == MIB
