"""The floor for a trio forwarder: a TCP relay with no HTTP at all.

`python -m bench.relay --upstream-port N` listens on a free port (printed as
`PORT <n>`) and pipes every connection to the upstream byte for byte, one task per
direction, each a `receive_some` / `send_all` loop. The bench runs it pinned on the
gateway's CPU and sends it the same paced streams: its CPU per line is what any program
on trio pays on this machine to wake up for one line and pass it on, before any HTTP.
`--blocking` relays with blocking sockets and threads instead (no event loop at all).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
from functools import partial

import trio

BUFFER = 65536


async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(BUFFER):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await sink.aclose()


async def relay(upstream_port: int, client: trio.SocketStream) -> None:
    try:
        upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    except OSError:
        await client.aclose()
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe, client, upstream)
        nursery.start_soon(pipe, upstream, client)


async def main(upstream_port: int) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"PORT {port}", flush=True)
    await trio.serve_listeners(partial(relay, upstream_port), listeners)


def blocking_pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(BUFFER):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def blocking_main(upstream_port: int) -> None:
    """The same relay with blocking sockets and two threads per connection: no event
    loop at all, so what it costs per line is CPython's and the machine's."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=blocking_pipe, args=(source, sink), daemon=True).start()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--blocking", action="store_true", help="threads, no event loop")
    args = parser.parse_args()
    try:
        if args.blocking:
            blocking_main(args.upstream_port)
        else:
            trio.run(main, args.upstream_port)
    except KeyboardInterrupt:
        sys.exit(0)
