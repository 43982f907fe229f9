"""What `make run` starts (`python -m stack`, the same entry point, on loopback ports and a fresh demo
directory), driven by the CLI and the Python clients as a user would: base and adapter requests, streaming,
list models, load / unload with the admin token (and refused without it), adapters that resolvers load on
their first request (filesystem, the Hub's offline cache), a clear NOT_FOUND; then Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys

import grpc
import pytest

from loraserve_client import AsyncClient, Client, LoRAServeError
from tests.child_env import child_env
from tests.stack_process import ROOT, TOKEN, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack") / "demo") as st:
        yield st.proc, st.address, st.demo, st.lines


def cli(address: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = child_env()
    env.pop("LORASERVE_ADMIN_TOKEN", None)
    if token is not None:
        env["LORASERVE_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "loraserve_client", "--address", address, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_banner_says_what_to_try(stack):
    _, address, _, lines = stack
    banner = []
    while not banner or "Ctrl-C" not in banner[-1]:  # the banner ends with the Ctrl-C line
        banner.append(lines.get(timeout=30))
    text = "".join(banner)
    assert f"--address {address} generate --model sql-lora" in text and "Ctrl-C" in text
    assert f"export LORASERVE_ADMIN_TOKEN={TOKEN}" in text


def test_cli_models_generate_and_stream(stack):
    _, address, _, _ = stack
    models = cli(address, "models")
    assert models.returncode == 0, models.stderr
    rows = {line.split()[0]: line for line in models.stdout.splitlines()}
    assert rows["demo-llama"].split()[1] == "base"
    # pre-loaded on the worker (name=path and the JSON form), listed as adapters of the base model
    assert "adapter of demo-llama" in rows["sql-lora"] and "adapter of demo-llama" in rows["math-lora"]
    # ... with the rank and version of the copy the worker holds (the store has them registered, not fetched)
    assert re.search(r"rank 4, [0-9a-f]{12}$", rows["sql-lora"]), rows["sql-lora"]
    assert re.search(r"rank 8, [0-9a-f]{12}$", rows["math-lora"]), rows["math-lora"]

    out = cli(address, "generate", "--model", "sql-lora", "--max-tokens", "5", "--temperature", "0", "--json",
              "Write a SQL query:")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["adapter"] == "sql-lora" and len(result["adapter_hash"]) == 64
    assert (result["completion_tokens"], result["finish_reason"], result["worker_id"]) == (5, "length", "worker-0")

    streamed = cli(address, "generate", "--stream", "--max-tokens", "6", "--temperature", "0", "Once upon a time")
    assert streamed.returncode == 0 and streamed.stdout.strip(), streamed.stderr


def test_clients_sync_and_async_agree_and_resolvers_load_on_first_request(stack):
    _, address, _, _ = stack
    with Client(address) as c:
        base = c.generate("Hello there", max_tokens=6, temperature=0)
        assert base.adapter == "" and base.completion_tokens == 6
        chunks = list(c.stream("Hello there", max_tokens=6, temperature=0))
        assert "".join(ch.text for ch in chunks) == base.text and chunks[-1].finish_reason == "length"
        # greedy tokens with and without an adapter differ (the adapters' B is not zero)
        assert c.generate("Hello there", model="math-lora", max_tokens=6, temperature=0).token_ids != base.token_ids
        # code-lora: only in the adapters directory (the filesystem resolver); chat-lora: the Hub cache
        for name in ("code-lora", "demo-org/chat-lora"):
            got = c.generate("def f(x):", model=name, max_tokens=3, temperature=0)
            assert got.adapter == name and got.completion_tokens == 3
        with pytest.raises(LoRAServeError) as info:
            c.generate("x", model="no-such-lora")
        assert info.value.code == grpc.StatusCode.NOT_FOUND and "no-such-lora" in info.value.details
        with pytest.raises(LoRAServeError) as info:
            c.generate("x", model="../etc")
        assert info.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)

    async def run():
        async with AsyncClient(address) as ac:
            one = await ac.generate("Hello there", max_tokens=6, temperature=0)
            parts = [ch async for ch in ac.stream("Hello there", max_tokens=6, temperature=0)]
            names = {m.id for m in await ac.models()}
            return one, parts, names

    one, parts, names = asyncio.run(run())
    assert one.token_ids == base.token_ids and "".join(p.text for p in parts) == base.text
    assert {"code-lora", "demo-org/chat-lora"} <= names


def test_load_and_unload_need_the_token(stack):
    _, address, demo, _ = stack
    source = str(demo / "adapters" / "chat-lora")
    refused = cli(address, "load", "my-lora", source, token="wrong")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    missing = cli(address, "load", "my-lora", source, token="")
    assert missing.returncode == 1 and "token" in missing.stderr

    loaded = cli(address, "load", "my-lora", source)
    assert loaded.returncode == 0 and "loaded my-lora" in loaded.stdout, loaded.stderr
    with Client(address, token=TOKEN) as c:
        assert c.generate("hi", model="my-lora", max_tokens=2).adapter == "my-lora"
        c.unload("my-lora")
        assert "my-lora" not in {m.id for m in c.models()}
        with pytest.raises(LoRAServeError) as info:
            c.generate("hi", model="my-lora", max_tokens=2)
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_the_serving_example_runs_against_it(stack):
    """examples/serving.py: models with lineage, pre-loaded adapters (both forms), resolvers, runtime load,
    in-place reload (new requests get the new version), unload."""
    _, address, demo, _ = stack
    env = child_env(LORASERVE_ADMIN_TOKEN=TOKEN)
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "serving.py"), "--address", address, "--adapters",
                          str(demo / "adapters")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "math-lora" in out and "of demo-llama" in out and "no-such-adapter: NOT_FOUND" in out
    assert "reloaded in place as" in out and "unloaded; listed: False" in out


def test_ctrl_c_stops_every_service(stack):
    proc, _, demo, _ = stack
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    for name in ("adapter-store", "worker", "router"):
        assert (demo / "logs" / f"{name}.log").is_file()
    leftover = subprocess.run(["pgrep", "-f", str(demo)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the stack still running: {leftover}"
