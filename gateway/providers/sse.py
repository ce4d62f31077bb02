"""Server-sent events, free of I/O: feed bytes, get each event's `data` payload."""

from __future__ import annotations

from gateway.providers.protocols import UsageTally


class SseSplitter:
    """Splits an SSE byte stream into the `data` of each event (multi-line data joined by
    `\\n`), accepting `\\n`, `\\r\\n` and `\\r` line ends as the SSE spec does. Comments and
    other fields (`event`, `id`, `retry`) are skipped: chat completions use `data` only."""

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._held_cr = b""
        self._data: list[bytes] = []
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        events: list[bytes] = []
        chunk = self._held_cr + chunk
        # A `\r` at a chunk's end may be half of a `\r\n`: decide with the next chunk.
        self._held_cr = b"\r" if chunk.endswith(b"\r") else b""
        if self._held_cr:
            chunk = chunk[:-1]
        self._buffer += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self._max:
            raise ValueError(f"an SSE line is longer than {self._max} bytes")
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events


def sse_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


DONE = sse_event(b"[DONE]")


class SseWatch:
    """Watches an SSE stream that is forwarded untouched: token counts from the events
    that carry `usage` (only those are decoded), and whether the bytes so far end
    mid-event, so an in-band error can start on an event boundary."""

    def __init__(self) -> None:
        self._splitter = SseSplitter()
        self.usage = UsageTally()
        self.mid_event = False
        self._broken = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.mid_event = not (chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n"))
        if self._broken:
            return
        try:
            events = self._splitter.feed(chunk)
        except ValueError:
            self._broken = True  # telemetry only: an odd stream is the client's to judge
            return
        for data in events:
            self.usage.feed(data)
