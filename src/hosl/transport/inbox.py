"""A session's incoming frames, one at a time, each with a deadline.

gRPC hands a servicer its request stream as a blocking iterator: a peer that sends nothing keeps
the handler's thread (and, after the handshake, the training lock) for ever. `Inbox` reads the
stream on a helper thread, only when the handler asks for the next frame, so the handler can give
up after a timeout (the hello timeout before the handshake, the idle timeout after it) and end the
call. Reading on demand also means the frame limit can be raised after the hello without a frame
having been read ahead under the old limit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from hosl.transport.codec import CodecError
from hosl.transport.framing import Reassembler


class InboxTimeout(Exception):
    """No frame arrived within the timeout."""


class InboxClosed(Exception):
    """The peer ended its stream, or the call was cancelled."""


_STOP = object()


class Inbox:
    def __init__(self, messages: Iterator[bytes], assembler: Reassembler) -> None:
        self._messages = messages
        self.assembler = assembler
        self._wanted: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._got: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._busy = False  # a request to the reader is outstanding
        self._thread = threading.Thread(target=self._run, name="hosl-inbox", daemon=True)
        self._thread.start()

    def next(self, timeout: float) -> bytes:
        """The next whole frame. Raises InboxTimeout, InboxClosed, or CodecError."""
        if not self._busy:
            self._wanted.put(None)
            self._busy = True
        try:
            what, value = self._got.get(timeout=timeout)
        except queue.Empty:
            raise InboxTimeout() from None
        self._busy = False
        if what == "frame":
            assert isinstance(value, bytes)
            return value
        if what == "bad":
            assert isinstance(value, CodecError)
            raise value
        raise InboxClosed()

    def close(self) -> None:
        """Stop reading. A reader blocked in the stream ends when gRPC ends the call."""
        self._wanted.put(_STOP)

    def _run(self) -> None:
        try:
            while self._wanted.get() is not _STOP:
                self._got.put(("frame", self._read_frame()))
        except (StopIteration, grpc.RpcError):
            self._got.put(("closed", None))
        except CodecError as err:
            self._got.put(("bad", err))
        finally:
            self.assembler.reset()  # a refused or vanished peer's partial frame is freed now

    def _read_frame(self) -> bytes:
        for message in self._messages:
            frame = self.assembler.feed(message)
            if frame is not None:
                return frame
        if self.assembler.in_frame:
            raise CodecError("the stream ended inside a chunked frame")
        raise StopIteration
