"""The hot path's HTTP/1.1 client to one origin (the Ollama target's transport), by name.

It is three modules, each about one concern: `gateway.h1.pool` (the connections, their
slots and the watchdog of deadlines), `gateway.h1.response` (one exchange: send, read the
head, stream the body) and `gateway.h1.connection` (one socket's reads and writes). This
module keeps the names the rest of the gateway imports.
"""

from gateway.h1.pool import MAX_READ_BYTES, ConnectionPool
from gateway.h1.response import Response

__all__ = ["MAX_READ_BYTES", "ConnectionPool", "Response"]
