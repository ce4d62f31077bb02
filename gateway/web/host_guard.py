"""The DNS-rebinding guard (ADR 0013): while the gateway listens on loopback only, a
request whose `Host` names anything but a local name or an address is refused with 403.

A web page a user opens can resolve its own domain to 127.0.0.1 once loaded and then call
`http://evil.example:11435/...` from the browser as same-origin: without this check it
could drive the API (and spend the cloud keys) and read `/status.json` whenever inbound
auth is off. Ollama closed the same hole for itself (CVE-2024-28224) with the same rule,
which this follows: only on a loopback bind (a LAN bind is reached by whatever names the
LAN gives it, and tokens protect it); allowed are no Host, `localhost`, this machine's
hostname, names under `.localhost`, `.local` and `.internal`, and IP addresses that are
loopback, private or unspecified; `allowed_hosts` adds names (a reverse proxy's), and
`"*"` turns the check off. Pure functions; the middleware calls `allowed` per request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_SEEN_MAX = 256


def guards(bind_host: str) -> bool:
    """Whether a listener on `bind_host` is loopback only (then the guard is on)."""
    host = bind_host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: reached by that name, not guarded


def host_name(value: bytes | None) -> str:
    """The host part of a `Host` header: lower case, without the port or IPv6 brackets."""
    if not value:
        return ""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    name, colon, port = text.rpartition(":")
    return name if colon and port.isdigit() else text


class HostGuard:
    """`allowed(header)`: the rule above, with the configured extra names."""

    def __init__(
        self, bind_host: str, extra: Iterable[str], *, hostname: str | None = None
    ) -> None:
        names = {name.strip().lower() for name in extra}
        self.active = guards(bind_host) and "*" not in names
        own = (hostname if hostname is not None else socket.gethostname()).lower()
        self._names = frozenset({"", "localhost", own, *names})
        # The few Host values real clients send, decided once (an address's parse costs
        # microseconds, the lookup a fraction of one).
        self._seen: dict[bytes | None, bool] = {}

    def allowed(self, value: bytes | None) -> bool:
        if not self.active:
            return True
        known = self._seen.get(value)
        if known is None:
            known = self._decide(value)
            if len(self._seen) < _SEEN_MAX:  # Host values are the client's: bounded
                self._seen[value] = known
        return known

    def _decide(self, value: bytes | None) -> bool:
        host = host_name(value)
        if host in self._names or host.endswith(LOCAL_SUFFIXES):
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_loopback or address.is_private or address.is_unspecified
