"""The HTTP server: hypercorn's configuration, sockets, TLS and lifespan, with the
gateway's own HTTP/1.1 connections (`gateway.h1.serve`) and drain.

hypercorn's `worker_serve` is re-composed here from its public-enough pieces (Config,
Lifespan) for these reasons, each measured (ADR 0006, ADR 0014):

- Its h11 protocol stack cost 1.05 ms of CPU per request on the target machine, more
  than the gateway's whole budget; `gateway.h1.serve` does the same work in a fraction
  (one task per connection, writes straight to the socket).
- A client that stops reading blocked hypercorn's `send_all` forever; every write here
  has a deadline (`write_timeout_s`), past which the connection is dropped, the app sees
  a disconnect and its request is cancelled, which frees the gate.
- Idle keep-alive connections close after `keep_alive_timeout_s`, and at once when the
  client closes them or the server shuts down.
- Shutdown drains through `gateway.drain.Drain`, so running streams end with an error
  line, not a cut.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.utils import repr_socket_addr, wrap_app

from gateway.drain import Drain
from gateway.h1.serve import (
    REQUEST_BODY_TIMEOUT_S,
    Connection,
    DateHeader,
    Transport,
    accept_loop,
)

log = logging.getLogger("gateway.server")

LISTEN_BACKLOG = 2048

# Time left after the drain for handlers to write their last error line and close.
CLOSE_MARGIN_S = 3.0


def hypercorn_config(
    bind: str,
    *,
    keep_alive_timeout_s: float,
    max_body_bytes: int,
    grace_s: float,
    certfile: str = "",
    keyfile: str = "",
) -> HyperConfig:
    config = HyperConfig()
    config.bind = [bind]
    if certfile:
        config.certfile = certfile
        config.keyfile = keyfile
    config.keep_alive_timeout = keep_alive_timeout_s
    # Only HTTP/1.1 is spoken: never offer h2 in the TLS handshake.
    config.alpn_protocols = ["http/1.1"]
    # Room for a burst of connections (hypercorn's default of 100 overflowed at 1,000).
    config.backlog = LISTEN_BACKLOG
    config.graceful_timeout = grace_s + CLOSE_MARGIN_S
    # Request bodies are bounded by the app (with Ollama's error shape); these are the
    # header-size and queue limits of the HTTP layer itself.
    config.h11_max_incomplete_size = 64 * 1024
    config.wsgi_max_body_size = max_body_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_http(
    app: Any,
    config: HyperConfig,
    *,
    drain: Drain,
    grace_s: float,
    write_timeout_s: float,
    request_body_timeout_s: float = REQUEST_BODY_TIMEOUT_S,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns, then drain; reports the bound URLs."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    connections: set[Connection] = set()
    date = DateHeader()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        sockets = config.create_sockets()
        ssl_context = config.create_ssl_context()
        listening: list[tuple[socket.socket, bool]] = [
            *((sock, True) for sock in sockets.secure_sockets),
            *((sock, False) for sock in sockets.insecure_sockets),
        ]
        binds: list[str] = []
        for sock, secure in listening:
            sock.listen(config.backlog)
            scheme = "https" if secure and ssl_context is not None else "http"
            binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")

        async def handle(sock: socket.socket, address: Any, *, secure: bool) -> None:
            with sock:
                try:
                    await serve_connection(sock, address, secure=secure)
                except Exception:  # a fault in one connection must not stop the server
                    log.exception("a client connection failed")

        async def serve_connection(sock: socket.socket, address: Any, *, secure: bool) -> None:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if secure and ssl_context is not None:
                stream = trio.SSLStream(
                    trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
                    ssl_context,
                    server_side=True,
                    https_compatible=True,
                )
                transport = Transport(stream=stream, write_timeout_s=write_timeout_s)
            else:
                transport = Transport(sock=sock, write_timeout_s=write_timeout_s)
            connection = Connection(
                transport,
                app,
                scheme="https" if secure and ssl_context is not None else "http",
                client=_address(address),
                server=_address(sock.getsockname()),
                state=lifespan_state,
                keep_alive_timeout_s=config.keep_alive_timeout,
                request_body_timeout_s=request_body_timeout_s,
                date=date,
            )
            connections.add(connection)
            try:
                await connection.run()
            finally:
                connections.discard(connection)

        try:
            async with trio.open_nursery() as server_nursery:
                async with trio.open_nursery() as accept_nursery:
                    for sock, secure in listening:

                        async def handle_one(
                            s: socket.socket, a: Any, secure: bool = secure
                        ) -> None:
                            await handle(s, a, secure=secure)

                        accept_nursery.start_soon(accept_loop, sock, handle_one, server_nursery)
                    task_status.started(binds)
                    await shutdown_trigger()
                    accept_nursery.cancel_scope.cancel()
                _close_listeners(listening)
                # Idle keep-alive connections close now; running requests drain.
                for connection in list(connections):
                    connection.stop_when_idle()
                server_nursery.cancel_scope.deadline = (
                    trio.current_time() + grace_s + CLOSE_MARGIN_S
                )
                with trio.move_on_after(grace_s + CLOSE_MARGIN_S):
                    await drain.drain(grace_s)
        finally:
            _close_listeners(listening)

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def _close_listeners(listening: list[tuple[socket.socket, bool]]) -> None:
    for sock, _ in listening:
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
            sock.close()


def _address(address: Any) -> tuple[str, int] | None:
    """`(host, port)` of an IPv4 or IPv6 socket address; None for other families."""
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
