"""Length-prefixed msgspec msgpack frames between a runner and its worker process.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of a msgpack body
(one tagged struct of ``messages.ToWorker`` or ``messages.FromWorker``).

Two sides:

* :class:`SyncChannel` -- the worker's side: a blocking socket, reads from one thread, writes
  from several (a lock keeps frames whole).
* :class:`TrioChannel` -- the server's side: over any trio ``Stream``, ``await receive()`` from
  one task, ``await send()`` from many (a trio lock keeps frames whole).

Neither imports trio at module level, so the worker process never pays for it.

Errors: a clean end of stream at a frame boundary reads as ``None``; an end of stream inside a
frame, an oversize frame or an undecodable body raise :class:`FrameError` with the reason.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:  # pragma: no cover
    import trio

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # bytes of body; a prompt or a completion is far below this

_encoder = msgspec.msgpack.Encoder()


class FrameError(Exception):
    """The peer sent something that is not a whole, valid, small enough frame."""


def encode_frame(msg: Any, *, max_frame: int = MAX_FRAME) -> bytes:
    """Header + body of one message; raises FrameError when the body is over ``max_frame``."""
    body = _encoder.encode(msg)
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes is over the limit of {max_frame} bytes "
                         f"({type(msg).__name__})")
    return HEADER.pack(len(body)) + body


def _check_length(n: int, max_frame: int) -> None:
    if n > max_frame:
        raise FrameError(f"peer announced a frame of {n} bytes, over the limit of {max_frame} bytes")


def _decode(decoder: msgspec.msgpack.Decoder, body: bytes | bytearray | memoryview) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise FrameError(f"undecodable frame of {len(body)} bytes: {e}") from None


# ------------------------------------------------------------------------------------------
# worker side: blocking socket
# ------------------------------------------------------------------------------------------


class SyncChannel:
    """Frames over a blocking socket. ``recv`` from one thread; ``send`` from any thread."""

    def __init__(self, sock: socket.socket, decode_type: Any, *, max_frame: int = MAX_FRAME):
        self.sock = sock
        self.max_frame = max_frame
        self._decoder = msgspec.msgpack.Decoder(decode_type)
        self._write_lock = threading.Lock()

    def _recv_exactly(self, n: int, *, what: str) -> bytes | None:
        """n bytes, or None when the stream ends before the first byte."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                if got == 0:
                    return None
                raise FrameError(f"stream ended inside a frame {what} ({got} of {n} bytes read)")
            got += k
        return bytes(buf)

    def recv(self) -> Any | None:
        """The next message, or None on a clean end of stream."""
        head = self._recv_exactly(HEADER.size, what="header")
        if head is None:
            return None
        (n,) = HEADER.unpack(head)
        _check_length(n, self.max_frame)
        body = self._recv_exactly(n, what="body") if n else b""
        if body is None:
            raise FrameError(f"stream ended after a frame header announcing {n} bytes")
        return _decode(self._decoder, body)

    def send(self, msg: Any) -> None:
        data = encode_frame(msg, max_frame=self.max_frame)
        with self._write_lock:
            self.sock.sendall(data)

    def send_encoded(self, data: bytes) -> None:
        """Frames already encoded with :func:`encode_frame` (several, joined), in one write."""
        with self._write_lock:
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------------
# server side: trio stream
# ------------------------------------------------------------------------------------------


class TrioChannel:
    """Frames over a trio ``Stream``. ``receive`` from one task; ``send`` from many tasks."""

    def __init__(self, stream: "trio.abc.Stream", decode_type: Any, *, max_frame: int = MAX_FRAME):
        import trio  # the worker process never builds one of these

        self.stream = stream
        self.max_frame = max_frame
        self._decoder = msgspec.msgpack.Decoder(decode_type)
        self._buf = bytearray()
        self._send_lock = trio.Lock()

    async def _fill(self, n: int) -> bool:
        """Buffer at least n bytes; False when the stream ended with nothing buffered."""
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self._buf)))
            if not chunk:
                if not self._buf:
                    return False
                raise FrameError(
                    f"stream ended inside a frame ({len(self._buf)} of {n} bytes buffered)"
                )
            self._buf += chunk
        return True

    async def receive(self) -> Any | None:
        """The next message, or None on a clean end of stream."""
        if not await self._fill(HEADER.size):
            return None
        (n,) = HEADER.unpack_from(self._buf)
        _check_length(n, self.max_frame)
        await self._fill(HEADER.size + n)
        body = bytes(self._buf[HEADER.size:HEADER.size + n])
        del self._buf[:HEADER.size + n]
        return _decode(self._decoder, body)

    async def send(self, msg: Any) -> None:
        data = encode_frame(msg, max_frame=self.max_frame)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_encoded(self, data: bytes) -> None:
        """Frames already encoded with :func:`encode_frame` (several, joined)."""
        async with self._send_lock:
            await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def read_frame(channel: TrioChannel) -> Any | None:
    """Functional spelling of ``channel.receive()``."""
    return await channel.receive()


async def write_frame(channel: TrioChannel, msg: Any) -> None:
    """Functional spelling of ``channel.send(msg)``."""
    await channel.send(msg)
