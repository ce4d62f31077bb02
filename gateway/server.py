"""The HTTP server: hypercorn's trio worker, with transport fixes and our own drain.

hypercorn's `worker_serve` is re-composed here (from its public-enough pieces: Config,
Lifespan, TCPServer, WorkerContext) for these reasons, each measured (STACK-NOTES 4-6):

- A client that stops reading blocked `send_all` forever (it runs shielded, with no
  timeout), holding the chat gate and shutdown. `_GatewayTCPServer` gives every write a
  deadline (`write_timeout_s`); past it the connection is dropped, the app sees a
  disconnect and its request is cancelled, which frees the gate.
- Under quart-trio the idle keep-alive timer was cancelled while being re-armed (the app's
  nursery is cancelled by the disconnect hypercorn sends during the final send), so idle
  connections never closed; during shutdown the same cancellation interrupted the close
  of a recycled connection. Re-arming and closing are shielded here.
- When a client closes its connection, the keep-alive timer is stopped at once, so
  the socket and its tasks go then, not `keep_alive_timeout_s` later.
- Shutdown drains through `gateway.drain.Drain` before hypercorn's own graceful timeout,
  so running streams end with an error line, not a cut.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import Closed, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from gateway.drain import Drain

log = logging.getLogger("gateway.server")

LISTEN_BACKLOG = 2048

# Time left after the drain for handlers to write their last error line and close.
CLOSE_MARGIN_S = 3.0


class _GatewayTCPServer(TCPServer):
    """hypercorn's connection, with a write deadline and shielded timer and close steps.

    The write deadline is kept by one watchdog task per connection rather than a
    `fail_after` around every write: a write is on the hot path (each streamed line),
    a watchdog wakes once per `write_timeout_s`.
    """

    def __init__(self, *args: Any, write_timeout_s: float) -> None:
        super().__init__(*args)
        self._write_timeout_s = write_timeout_s
        self._writing_since: float | None = None
        self._watchdog: trio.CancelScope | None = None

    async def _read_data(self) -> None:
        # Runs in the connection's task group for the connection's whole life. When it
        # ends (the client closed, or we dropped it), the connection's other tasks must
        # end too: hypercorn left the keep-alive timer armed, which held the socket and
        # two tasks for `keep_alive_timeout_s` after the client had gone.
        # The write watchdog lives exactly as long as this loop: started here, not at the
        # first write (a write after the client left would start one nobody stops).
        self._watchdog = trio.CancelScope()
        self._task_group.spawn(self._watch_writes, self._watchdog)
        try:
            await super()._read_data()
        finally:
            self._watchdog.cancel()
            with trio.CancelScope(shield=True):
                await self.idle_task.stop()

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, RawData):
            async with self.send_lock:
                self._writing_since = trio.current_time()
                try:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
                finally:
                    self._writing_since = None
        elif isinstance(event, Updated | Closed):
            # Both run inside the app's last send, which the app's disconnect watcher may
            # cancel: an unarmed idle timer or a half-done close leaves the socket open.
            with trio.CancelScope(shield=True):
                await super().protocol_send(event)
        else:
            await super().protocol_send(event)

    async def _watch_writes(self, scope: trio.CancelScope) -> None:
        """Drop the connection when one write has waited `write_timeout_s` for the client:
        closing wakes the blocked write, the app sees a disconnect, the gate is freed."""
        timeout = self._write_timeout_s
        with scope:
            while True:
                since, now = self._writing_since, trio.current_time()
                if since is not None and now - since >= timeout:
                    log.warning("dropped a client that read nothing for %g s", timeout)
                    with trio.CancelScope(shield=True):
                        await self.stream.aclose()
                    return
                await trio.sleep(timeout if since is None else since + timeout - now)


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
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns, then drain; reports the bound URLs."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        sockets = config.create_sockets()
        listeners: list[trio.abc.Listener[Any]] = []
        binds: list[str] = []
        ssl_context = config.create_ssl_context()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.listen(config.backlog)
            listener: trio.abc.Listener[Any] = trio.SocketListener(
                trio.socket.from_stdlib_socket(sock)
            )
            secure = sock in sockets.secure_sockets
            if secure and ssl_context is not None:
                listeners.append(trio.SSLListener(listener, ssl_context, https_compatible=True))
            else:
                listeners.append(listener)
            scheme = "https" if secure else "http"
            binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")

        handler = partial(
            _GatewayTCPServer,
            wrapped,
            config,
            context,
            ConnectionState(lifespan_state.copy()),
            write_timeout_s=write_timeout_s,
        )
        async with trio.open_nursery() as server_nursery:
            async with trio.open_nursery() as accept_nursery:
                accept_nursery.start_soon(
                    partial(
                        trio.serve_listeners, handler, listeners, handler_nursery=server_nursery
                    )
                )
                task_status.started(binds)
                await shutdown_trigger()
                accept_nursery.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            # Idle keep-alive connections close on `terminated`; running requests drain.
            await context.terminated.set()
            server_nursery.cancel_scope.deadline = trio.current_time() + grace_s + CLOSE_MARGIN_S
            with trio.move_on_after(grace_s + CLOSE_MARGIN_S):
                await drain.drain(grace_s)

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
