"""What the tier starts listens on 127.0.0.1 only (ports picked at run time); that every
process is stopped at the end is checked by the session teardown in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

from e2e.conftest import Gateway, Service


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _listening(inodes: set[int]) -> list[tuple[str, int]]:
    """(local address, port) of every listening TCP socket among `inodes`, v4 and v6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            local, state, inode = cols[1], cols[3], int(cols[9])
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            if len(address_hex) == 8:
                address = ".".join(str(b) for b in reversed(bytes.fromhex(address_hex)))
            else:
                address = "v6:" + address_hex
            found.append((address, int(port_hex, 16)))
    return found


async def test_every_listener_is_loopback(
    gateway: Gateway, llama_chat: Service, llama_embed: Service, proxy: Service
) -> None:
    for service in (llama_chat, llama_embed, proxy):
        inodes: set[int] = set()
        for pid in _group_pids(service.proc.pid):
            inodes |= _socket_inodes(pid)
        listeners = _listening(inodes)
        assert listeners == [("127.0.0.1", service.port)], (service.name, listeners)
    ours = _listening(_socket_inodes(os.getpid()))
    gateway_port = int(gateway.url.rsplit(":", 1)[1])
    assert ("127.0.0.1", gateway_port) in ours
    assert all(address == "127.0.0.1" for address, _ in ours), ours
