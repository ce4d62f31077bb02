"""The GPU hosts: each one a unit (`Host`: client pool, inventory, gate, embedder warm-up),
and the set of them that places each request (`Hosts`), ADR 0020."""

from gateway.hosts.host import Host
from gateway.hosts.set import Hosts, open_hosts

__all__ = ["Host", "Hosts", "open_hosts"]
