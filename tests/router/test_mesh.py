"""Mesh citizenship: workers discovered through a DNS name with several addresses (a local DNS server in the
test, as a headless Service answers), changes picked up on re-resolution; the adapter and request id headers
on every call to a worker, never a client's copy."""

from __future__ import annotations

import contextlib
import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from router import errors
from router.config import RouterConfig
from router.registry_dns import DnsMembership
from router.store_client import StoreClient
from tests.router.conftest import gen_request, router_config, router_stub, running_router, stream_request
from tests.router.fakes import FakeWorker, serving
from tests.services import wait_until

NAME = "workers.loraserve.test"


class LocalDns:
    """A DNS server on loopback answering A queries for the names in `records` (TTL 0), NXDOMAIN otherwise."""

    def __init__(self):
        self.records: dict[str, list[str]] = {}
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            self.queries += 1
            reply = dns.message.make_response(query)
            q = query.question[0]
            name = q.name.to_text().rstrip(".")
            if name not in self.records:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif q.rdtype == dns.rdatatype.A and self.records[name]:
                reply.answer.append(dns.rrset.from_text_list(q.name, 0, "IN", "A", self.records[name]))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def local_dns():
    server = LocalDns()
    yield server
    server.close()


def resolve(membership: DnsMembership, loop) -> set[str]:
    return loop.run(membership.refresh())


def test_every_address_of_the_name_is_a_worker_and_changes_are_picked_up(loop, local_dns):
    seen: list[set[str]] = []
    m = DnsMembership((f"{NAME}:50053",), 5.0, seen.append, local_dns.address)
    local_dns.records[NAME] = ["127.0.0.2", "127.0.0.3"]
    assert resolve(m, loop) == {"127.0.0.2:50053", "127.0.0.3:50053"} == seen[-1]
    local_dns.records[NAME] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # a pod became ready
    assert resolve(m, loop) == {"127.0.0.2:50053", "127.0.0.3:50053", "127.0.0.4:50053"}
    local_dns.records[NAME] = ["127.0.0.3"]  # two went away
    assert resolve(m, loop) == {"127.0.0.3:50053"}
    del local_dns.records[NAME]  # the Service is gone: no workers
    assert resolve(m, loop) == set()


def test_a_failed_lookup_keeps_the_last_answer(loop, local_dns):
    m = DnsMembership((f"{NAME}:7000",), 5.0, lambda _: None, local_dns.address)
    local_dns.records[NAME] = ["127.0.0.5"]
    assert resolve(m, loop) == {"127.0.0.5:7000"}
    local_dns.close()  # the DNS server stops answering: a hiccup, not an empty cluster
    assert resolve(m, loop) == {"127.0.0.5:7000"}


def test_the_system_resolver_by_default(loop):
    assert "127.0.0.1:1234" in resolve(DnsMembership(("localhost:1234",), 5.0, lambda _: None), loop)
    assert resolve(DnsMembership(("no-such-host.invalid:1",), 5.0, lambda _: None), loop) == set()


def free_port_on(*hosts: str) -> int:
    """A port free on every one of `hosts` (loopback aliases)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            with contextlib.ExitStack() as stack:
                for h in hosts[1:]:
                    sock = stack.enter_context(socket.socket())
                    sock.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def test_the_router_follows_the_name(loop, local_dns):
    """Two fake workers on one port of two loopback addresses behind one name; the router routes to both,
    and drops the one the name no longer lists."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    workers = [FakeWorker("dns-a"), FakeWorker("dns-b")]
    local_dns.records[NAME] = ["127.0.0.2", "127.0.0.3"]
    stack = contextlib.AsyncExitStack()
    for w, host in zip(workers, ("127.0.0.2", "127.0.0.3")):
        loop.run(stack.enter_async_context(serving(w, host, port)))
    try:
        config = router_config(workers_dns=(f"{NAME}:{port}",), dns_nameserver=local_dns.address, dns_refresh_s=0.2)
        with running_router(loop, config) as router, router_stub(router) as stub:
            assert wait_until(lambda: {e.worker_id for e in router.registry.routable()} == {"dns-a", "dns-b"}, 15)
            assert stub.Generate(gen_request("", max_tokens=2), timeout=10).text
            local_dns.records[NAME] = ["127.0.0.3"]
            assert wait_until(lambda: {e.worker_id for e in router.registry.routable()} == {"dns-b"}, 15)
            served = {stub.Generate(gen_request("", max_tokens=2), timeout=10).served_by.worker_id for _ in range(4)}
            assert served == {"dns-b"}
    finally:
        loop.run(stack.aclose())


def test_calls_to_workers_carry_the_adapter_and_request_id_never_a_clients_copy(loop):
    worker = FakeWorker("hdr")
    stack = contextlib.AsyncExitStack()
    loop.run(stack.enter_async_context(serving(worker)))
    try:
        with running_router(loop, router_config(workers=(worker.address,))) as router, router_stub(router) as stub:
            forged = (("x-lora-adapter", "someone-else"), ("x-request-id", "forged"))
            stub.Generate(gen_request("sql-lora", max_tokens=2, request_id="r-1"), metadata=forged, timeout=10)
            list(stub.GenerateStream(stream_request("", max_tokens=2, request_id="r-2"), metadata=forged, timeout=10))
            by_id = {s.request_id: s.metadata for s in worker.seen}
            assert by_id["r-1"]["x-lora-adapter"] == "sql-lora" and by_id["r-1"]["x-request-id"] == "r-1"
            assert "x-lora-adapter" not in by_id["r-2"] and by_id["r-2"]["x-request-id"] == "r-2"
    finally:
        loop.run(stack.aclose())


def test_a_proxyless_store_target_goes_through_xds(loop, monkeypatch):
    """store_address xds:///name dials through grpcio's xDS resolver: with no bootstrap the call fails saying
    so (the default host:port path needs no control plane: every other test)."""
    for var in ("GRPC_XDS_BOOTSTRAP", "GRPC_XDS_BOOTSTRAP_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    cfg = RouterConfig.from_args(["--workers", "a:1", "--store-address", "xds:///loraserve-adapter-store:50052"],
                                 environ={})

    async def resolve():
        client = StoreClient(cfg.store_address)
        try:
            return await client.resolve("sql-lora", timeout=5)
        finally:
            await client.close()

    with pytest.raises(errors.UnavailableError, match="GRPC_XDS_BOOTSTRAP"):
        loop.run(resolve())
    with pytest.raises(SystemExit):
        RouterConfig.from_args(["--workers", "a:1", "--store-address", "xds://no-third-slash"], environ={})
