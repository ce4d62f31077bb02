"""NDJSON framing, free of I/O: feed bytes in, get complete lines out.

Lines are split on `b"\\n"` only. `\\r`, U+0085 and U+2028 are valid inside JSON strings,
so splitters that treat them as line ends (httpx's `aiter_lines`) corrupt NDJSON.
A line longer than `max_line_bytes` is a protocol error, never an unbounded buffer.
"""

from __future__ import annotations

from gateway.errors import UpstreamProtocol

MAX_LINE_BYTES = 4 * 1024 * 1024


class LineTooLong(UpstreamProtocol):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upstream sent an NDJSON line longer than {limit} bytes")


class NdjsonSplitter:
    """Accumulates bytes and hands back each complete line, without its `\\n`.

    A trailing `\\r` is kept (the JSON decoder treats it as whitespace), and empty lines
    are skipped, as Ollama's own reader does.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            if self._partial:
                self._partial += data[start:end]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = data[start:end]
            if len(line) > self._max:
                raise LineTooLong(self._max)
            if line.strip():
                lines.append(line)
            start = end + 1
        self._partial += data[start:]
        if len(self._partial) > self._max:
            raise LineTooLong(self._max)
        return lines

    def close(self) -> bytes | None:
        """End of input: the unterminated last line, if any (Ollama always ends with `\\n`)."""
        rest = bytes(self._partial)
        self._partial.clear()
        return rest if rest.strip() else None


class FrameWatch:
    """Watches a byte stream that is forwarded untouched, at C speed per chunk.

    It keeps only what the gateway needs from a passthrough stream: the last complete
    line (Ollama's final `done` frame, for telemetry), whether the stream currently ends
    mid-line (so an error line can be preceded by a `\\n`), and the line-length bound.
    Only the line that spans chunks is measured: a line wholly inside one chunk is
    shorter than the chunk, and httpcore reads at most 64 KiB at a time.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._partial: list[bytes] = []
        self._partial_len = 0
        self.last_line = b""
        self.lines = 0

    @property
    def mid_line(self) -> bool:
        return self._partial_len > 0

    def feed(self, chunk: bytes) -> None:
        first = chunk.find(b"\n")
        if first == -1:
            self._partial.append(chunk)
            self._partial_len += len(chunk)
            if self._partial_len > self._max:
                raise LineTooLong(self._max)
            return
        # The line that spans chunks ends at this chunk's first newline.
        if self._partial_len + first > self._max:
            raise LineTooLong(self._max)
        last = chunk.rfind(b"\n")
        self.lines += chunk.count(b"\n")
        if first == last and self._partial:
            self.last_line = b"".join(self._partial) + chunk[:last]
        else:
            self.last_line = chunk[chunk.rfind(b"\n", 0, last) + 1 : last]
        self._partial.clear()
        rest = len(chunk) - last - 1
        self._partial_len = rest
        if rest:
            self._partial.append(chunk[last + 1 :])
            if rest > self._max:
                raise LineTooLong(self._max)
