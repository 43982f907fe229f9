"""Register / Delete: off unless enabled (PERMISSION_DENIED); when enabled, `authorization: Bearer <token>`
or UNAUTHENTICATED. Registrations survive a restart."""

from __future__ import annotations

import grpc
import pytest

from adapter_store.auth import AdminGuard
from adapter_store.errors import PermissionDeniedError, UnauthenticatedError
from gpu_worker.engine.lora.peft_adapter import content_hash as engine_content_hash
from loraserve.v1 import adapter_store_pb2, common_pb2

from .conftest import cache_entries, resolve, running_store, store_config, store_stub

TOKEN = "s3cr3t-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def register(stub, name, uri, replace=False, metadata=AUTH, base=""):
    req = adapter_store_pb2.RegisterAdapterRequest(name=name, source_uri=uri, replace=replace, base_model_name=base)
    return stub.RegisterAdapter(req, metadata=metadata, timeout=30).manifest


def delete(stub, name, metadata=AUTH):
    return stub.DeleteAdapter(adapter_store_pb2.DeleteAdapterRequest(name=name), metadata=metadata, timeout=30)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_admin_is_off_unless_enabled(store_loop, tmp_path, tiny_adapters):
    with running_store(store_loop, store_config(tmp_path / "cache", admin_token=TOKEN)) as server, \
            store_stub(server) as stub:
        assert code_of(lambda: register(stub, "x", str(tiny_adapters["sql-lora"]))) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: delete(stub, "x")) == grpc.StatusCode.PERMISSION_DENIED
        assert cache_entries(tmp_path / "cache") == []


def test_admin_needs_the_bearer_token(store_loop, tmp_path, tiny_adapters):
    uri = str(tiny_adapters["sql-lora"])
    with running_store(store_loop, store_config(tmp_path / "cache", enable_admin=True, admin_token=TOKEN)) as server, \
            store_stub(server) as stub:
        for metadata in [(), (("authorization", TOKEN),), (("authorization", "Bearer wrong"),),
                         (("authorization", f"Basic {TOKEN}"),), (("authorization", f"Bearer {TOKEN}x"),)]:
            assert code_of(lambda md=metadata: register(stub, "x", uri, metadata=md)) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda md=metadata: delete(stub, "x", metadata=md)) == grpc.StatusCode.UNAUTHENTICATED
        assert cache_entries(tmp_path / "cache") == []


def test_register_replace_delete_and_restart(store_loop, tmp_path, tiny_adapters):
    sql, chat = tiny_adapters["sql-lora"], tiny_adapters["chat-lora"]
    config = store_config(tmp_path / "cache", enable_admin=True, admin_token=TOKEN)
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        m = register(stub, "team/assistant", sql.as_uri(), base="tiny")
        assert (m.ref.content_hash, m.state, m.base_model_name) == (
            engine_content_hash(sql), common_pb2.ADAPTER_STATE_READY, "tiny")
        assert resolve(stub, "team/assistant") == m
        assert code_of(lambda: register(stub, "team/assistant", chat.as_uri())) == grpc.StatusCode.ALREADY_EXISTS
        replaced = register(stub, "team/assistant", chat.as_uri(), replace=True)  # the in-place reload path
        assert replaced.ref.content_hash == engine_content_hash(chat)
        assert resolve(stub, "team/assistant").ref.content_hash == replaced.ref.content_hash
        assert code_of(lambda: register(stub, "../x", sql.as_uri())) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: register(stub, "y", "ftp://host/x")) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: register(stub, "y", "")) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: register(stub, "y", str(tmp_path / "nowhere"))) == grpc.StatusCode.NOT_FOUND
        register(stub, "to-delete", sql.as_uri())
    with running_store(store_loop, config) as server, store_stub(server) as stub:  # registrations survive
        assert resolve(stub, "team/assistant").ref.content_hash == engine_content_hash(chat)
        listed = {m.ref.name for m in stub.ListAdapters(adapter_store_pb2.ListAdaptersRequest()).adapters}
        assert {"team/assistant", "to-delete"} <= listed
        delete(stub, "to-delete")
        assert code_of(lambda: resolve(stub, "to-delete")) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: delete(stub, "to-delete")) == grpc.StatusCode.NOT_FOUND
        assert not any(e.startswith("to-delete@") for e in cache_entries(tmp_path / "cache"))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        assert code_of(lambda: resolve(stub, "to-delete")) == grpc.StatusCode.NOT_FOUND  # stays deleted


def test_guard_compares_tokens():
    with pytest.raises(PermissionDeniedError):
        AdminGuard(False, "").check(f"Bearer {TOKEN}")
    guard = AdminGuard(True, TOKEN)
    guard.check(f"Bearer {TOKEN}")
    guard.check(f"bearer   {TOKEN} ")
    for bad in [None, "", "Bearer", f"Bearer{TOKEN}", f"Token {TOKEN}", "Bearer " + TOKEN[:-1]]:
        with pytest.raises(UnauthenticatedError):
            guard.check(bad)
    with pytest.raises(ValueError):
        AdminGuard(True, "")
