"""A body made of buffers that go out one after another without ever being joined (a model's tensors, each
sent straight from its memory), and its aiohttp payload, which writes it in slices so that at most one
slice waits in the transport's buffer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

SLICE = 1 << 20  # bytes handed to the transport at a time


class Chunks:
    """Buffers (bytes, memoryviews, contiguous arrays) that make one body. ``len`` is its size in bytes."""

    def __init__(self, parts: Iterable[Any]) -> None:
        self.parts = [m for m in (memoryview(p).cast("B") for p in parts) if m.nbytes]
        self.nbytes = sum(m.nbytes for m in self.parts)

    def __len__(self) -> int:
        return self.nbytes

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self.parts)

    def tobytes(self) -> bytes:
        """The body joined (one copy): for small bodies and tests."""
        return b"".join(self.parts)


class ChunksPayload(Payload):
    """``Chunks`` as a request or response body: its size is declared (Content-Length), its buffers are
    written slice by slice, each awaited (the writer drains), and it can be sent again (a retried request)."""

    _autoclose = True

    def __init__(self, chunks: Chunks, *, content_type: str) -> None:
        super().__init__(chunks, content_type=content_type)
        self._size = chunks.nbytes
        self.chunks = chunks

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        left = self._size if content_length is None else min(content_length, self._size)
        for part in self.chunks:
            for start in range(0, part.nbytes, SLICE):
                if left <= 0:
                    return
                piece = part[start : start + min(SLICE, left)]
                await writer.write(piece)
                left -= piece.nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.chunks.tobytes().decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.chunks.tobytes()
