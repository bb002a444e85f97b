"""Frames on the gRPC stream: chunking, reassembly and the size limits of both sides.

Every hosl message (a codec message: JSON header + raw tensor bytes) travels as one or more gRPC
messages. Each gRPC message starts with one tag byte:

    0x00  a whole frame        0x01  a chunk, more follow        0x02  the last chunk

Frames above `CHUNK_BYTES` (1 MiB) are cut into chunks, so gRPC's own per-message limit can stay
small and fixed on both sides (`grpc_options`) whatever the batch size: a 300 MB activation of a
large batch crosses as 300 chunks. gRPC receives a whole message before hosl sees any of it, so
this limit is also what a stream that has not said hello yet can make the server hold: with
16 MiB chunks, four such streams of chunks took a server's peak RSS up by 330 MiB; with 1 MiB
chunks the same attack is refused after 1 MiB each. The reassembler refuses a frame as soon as its
running size passes the limit, before it keeps any more of it, so a hostile stream of chunks
cannot make the receiver allocate more than the limit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from hosl.transport.codec import CodecError

CHUNK_BYTES = 1 << 20  # the largest gRPC message hosl sends
# gRPC's per-message limit on both sides: a chunk plus its tag byte, with headroom for a
# (small) control frame never being chunked at a slightly different boundary.
GRPC_MESSAGE_LIMIT = CHUNK_BYTES + (64 << 10)
DEFAULT_FRAME_LIMIT = 1 << 30  # the largest reassembled frame a receiver accepts by default
HELLO_LIMIT = 1 << 20  # the first frame of a session (its hello) is small; nothing larger before it

WHOLE, MORE, LAST = 0, 1, 2


def grpc_options(
    frame_limit: int = GRPC_MESSAGE_LIMIT, *, server: bool = False
) -> list[tuple[str, int]]:
    """Channel/server options, set deliberately instead of relying on gRPC's defaults
    (4 MB receive, unlimited send): one hosl chunk fits, anything larger is refused by gRPC
    itself before hosl sees it.

    Keepalive pings notice a peer that vanished without closing. A step can compute for minutes
    with no data on the stream, so the server must accept the client's pings during that time:
    by default it answers more than two pings without data with GOAWAY ("too_many_pings").
    """
    limits = [
        ("grpc.max_send_message_length", frame_limit),
        ("grpc.max_receive_message_length", frame_limit),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if server:
        return limits + [
            # gRPC lets a second server share a port by default (SO_REUSEPORT) and the kernel
            # then splits new sessions between them; a port is one hosl server's, or nobody's.
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 60_000),  # a client starved of CPU still answers
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),  # 0: never punish pings at that rate
        ]
    return limits + [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),  # 0: keep pinging while a step computes
    ]


def to_messages(frame: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """One frame -> the gRPC messages that carry it (one unless it is larger than a chunk)."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    if len(frame) <= chunk_bytes:
        yield bytes([WHOLE]) + frame
        return
    view = memoryview(frame)
    for start in range(0, len(frame), chunk_bytes):
        end = start + chunk_bytes
        yield bytes([LAST if end >= len(frame) else MORE]) + view[start:end].tobytes()


class ByteBudget:
    """Bytes of partial frames held across all of a server's connections, with a cap: a peer
    (or several) streaming chunks cannot make the server hold more than `capacity` at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> None:
        with self._lock:
            if self.used + size > self.capacity:
                raise CodecError(
                    f"the server is already buffering {self.used} bytes of frames; "
                    f"{size} more exceed its cap of {self.capacity}"
                )
            self.used += size

    def release(self, size: int) -> None:
        with self._lock:
            self.used = max(0, self.used - size)


@dataclass
class Reassembler:
    """gRPC messages -> frames. `feed` returns a complete frame, or None while chunks arrive.

    `limit` may change between frames (a server raises it once a hello is accepted). With a
    `budget`, the bytes of a partial frame are reserved there until the frame completes or
    `reset` drops it."""

    limit: int = DEFAULT_FRAME_LIMIT
    budget: ByteBudget | None = None
    _parts: list[bytes] | None = None
    _size: int = 0
    _reserved: int = field(default=0, repr=False)

    @property
    def in_frame(self) -> bool:
        """True between the first and the last chunk of a frame."""
        return self._parts is not None

    def feed(self, message: bytes) -> bytes | None:
        if not message:
            raise CodecError("empty gRPC message: every frame starts with a tag byte")
        # a view, not a copy: a refused message costs nothing beyond what gRPC already holds
        tag, body = message[0], memoryview(message)[1:]
        if tag not in (WHOLE, MORE, LAST):
            raise CodecError(f"unknown frame tag {tag}")
        if tag == WHOLE:
            if self._parts is not None:
                raise CodecError("a whole frame arrived in the middle of a chunked one")
            self._check(len(body))
            return bytes(body)
        size = self._size + len(body)
        self._check(size)
        self._reserve(len(body))
        parts = self._parts if self._parts is not None else []
        parts.append(bytes(body))
        if tag == MORE:
            self._parts, self._size = parts, size
            return None
        self.reset()
        return b"".join(parts)

    def reset(self) -> None:
        """Drop a partial frame and give its bytes back to the budget."""
        self._parts, self._size = None, 0
        if self.budget is not None and self._reserved:
            self.budget.release(self._reserved)
        self._reserved = 0

    def _reserve(self, size: int) -> None:
        if self.budget is None:
            return
        try:
            self.budget.reserve(size)
        except CodecError:
            self.reset()
            raise
        self._reserved += size

    def _check(self, size: int) -> None:
        if size > self.limit:
            self.reset()
            raise CodecError(f"a frame of at least {size} bytes exceeds the limit of {self.limit}")


def read_frames(messages: Iterator[bytes], limit: int = DEFAULT_FRAME_LIMIT) -> Iterator[bytes]:
    """Frames out of a stream of gRPC messages; a stream that ends inside a chunked frame is an
    error, not a silently shorter frame."""
    assembler = Reassembler(limit)
    for message in messages:
        frame = assembler.feed(message)
        if frame is not None:
            yield frame
    if assembler.in_frame:
        raise CodecError("the stream ended inside a chunked frame")
