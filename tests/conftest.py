"""Shared pytest fixtures: a tiny model, LoRA adapters, an offline Hub cache, a moto S3 server, Redis.

Immutable assets are built once per session into ``tmp_path_factory`` dirs; tests must not modify them
(copy first).  The Hub is made unreachable for the whole session: the env vars below are set before
anything imports huggingface_hub (which reads them at import time), and pytest_configure double-checks.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter. Triton caches the switch the first time anything
# asks (transformers and peft import triton), so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import services  # noqa: E402
from tests.services import HubCache, S3Adapters  # noqa: E402


def pytest_configure(config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported earlier (e.g. by a plugin): force its cached flag too
        constants.HF_HUB_OFFLINE = True


# ---------------------------------------------------------------- model / adapters / hub cache


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny random Llama (GQA, 2 layers, hidden 64) + byte-level BPE tokenizer, Hub checkpoint layout."""
    from demo.model import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """name -> PEFT adapter dir for every spec in ``demo.adapters.DEFAULT_ADAPTERS``."""
    from demo.adapters import build_default_adapters

    return build_default_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def rank32_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A rank-32 adapter on every projection: past the rank class of the default ones (SlotBuffers' rank strides)."""
    from demo.adapters import ALL_PROJ, build_lora_adapter

    return build_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("rank32") / "wide-lora", r=32, lora_alpha=32,
                              target_modules=ALL_PROJ, seed=9)


@pytest.fixture(scope="session")
def hub_cache(tiny_adapters, tmp_path_factory) -> HubCache:
    """A huggingface_hub cache dir holding ``demo-org/sql-lora`` (adapter at the repo root) and
    ``demo-org/lora-collection`` (the code-lora adapter under ``code/``).  Pass ``cache_dir=`` (or set
    HF_HUB_CACHE) and load offline."""
    from demo.hub_cache import fill_hub_cache

    cache_dir = tmp_path_factory.mktemp("hf-cache")
    info = HubCache(
        cache_dir=cache_dir,
        repo_id="demo-org/sql-lora",
        subfolder_repo_id="demo-org/lora-collection",
        subfolder="code",
        adapter_name="sql-lora",
        subfolder_adapter_name="code-lora",
    )
    fill_hub_cache(cache_dir, info.repo_id, tiny_adapters[info.adapter_name])
    sub_src = tiny_adapters[info.subfolder_adapter_name]
    fill_hub_cache(cache_dir, info.subfolder_repo_id, sub_src, subfolder=info.subfolder)
    return info


# ---------------------------------------------------------------- S3 (moto server over real HTTP)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL (``http://127.0.0.1:PORT``) of a moto S3 server; dummy AWS creds set in env meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in services.AWS_TEST_ENV.items():
            mp.setenv(key, value)
        for key in services.AWS_UNSET_ENV:
            mp.delenv(key, raising=False)
        server, endpoint = services.start_moto_server("127.0.0.1")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_adapter_bucket(s3_server, tiny_adapters) -> S3Adapters:
    """A bucket holding every fixture adapter under ``adapters/<name>/``.  Read-only by convention."""
    client = services.s3_client(s3_server)
    bucket = f"adapters-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    prefixes = {}
    for name, path in tiny_adapters.items():
        prefixes[name] = f"adapters/{name}/"
        services.upload_dir(client, bucket, prefixes[name], path)
    return S3Adapters(endpoint=s3_server, bucket=bucket, prefixes=prefixes)


# ---------------------------------------------------------------- Redis (real server, never skipped)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis the suite requires (``REDIS_URL`` env or 127.0.0.1:6379/0); fails if none."""
    url = os.environ.get("REDIS_URL", services.DEFAULT_REDIS_URL)
    try:
        services.connect_redis(url).close()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    if error:
        pytest.fail(error, pytrace=False)
    return url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to this test; everything under it is deleted after the test."""
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
def redis_client(redis_url, redis_prefix):
    """A redis-py client; put keys only under ``redis_prefix`` (they are deleted afterwards)."""
    client = services.connect_redis(redis_url)
    try:
        yield client
    finally:
        services.delete_prefix(client, redis_prefix)
        client.close()
