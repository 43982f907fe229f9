"""Worker discovery by DNS, beside the static list and Redis: every address a name resolves to is a worker
(a Kubernetes headless Service answers with one A/AAAA record per ready pod), re-resolved every `refresh_s`,
so a mesh deployment needs no Redis. Pods that come and go show up at the next resolution.

The system resolver (getaddrinfo: /etc/hosts, then the pod's resolv.conf with its search domains) is used
unless a nameserver is given, then dnspython asks that server directly. A failed lookup keeps the name's last
answer: a DNS hiccup must not empty the cluster (a worker that really went away fails its status stream and
is marked down anyway); a name that does not exist (NXDOMAIN) has no workers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


class NoSuchName(Exception):
    """The name does not exist (as opposed to a lookup that failed)."""


class DnsMembership:
    def __init__(self, names: tuple[str, ...], refresh_s: float, on_change: Callable[[set[str]], None],
                 nameserver: str = ""):
        self.names = names  # each "host:port"
        self.refresh_s = refresh_s
        self.on_change = on_change
        self.nameserver = nameserver
        self._last: dict[str, set[str]] = {}
        self._resolver = None

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> set[str]:
        """Resolve every name once and report the union of their addresses."""
        for name in self.names:
            host, _, port = name.rpartition(":")
            try:
                ips = await self._lookup(host)
            except NoSuchName:
                ips = set()
            except Exception as e:  # a failed lookup: keep the last answer
                log.warning("DNS lookup of %s failed (%s); keeping its last %d addresses", host, e,
                            len(self._last.get(name, ())))
                continue
            addresses = {f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips}
            if addresses != self._last.get(name):
                log.info("%s resolves to %s", host, ", ".join(sorted(addresses)) or "nothing")
            self._last[name] = addresses
        members = set().union(*self._last.values()) if self._last else set()
        self.on_change(members)
        return members

    async def _lookup(self, host: str) -> set[str]:
        if self.nameserver:
            return await self._ask_nameserver(host)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise NoSuchName(host) from None
            raise
        return {info[4][0] for info in infos}

    async def _ask_nameserver(self, host: str) -> set[str]:
        import dns.asyncresolver
        import dns.resolver

        if self._resolver is None:
            server, _, port = self.nameserver.rpartition(":")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [server.strip("[]")]
            resolver.port = int(port)
            resolver.lifetime = 2.0
            self._resolver = resolver
        ips: set[str] = set()
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except dns.resolver.NXDOMAIN:
                raise NoSuchName(host) from None
            except dns.resolver.NoAnswer:
                continue
            ips.update(r.address for r in answer)
        return ips
