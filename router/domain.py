"""The router's domain types. Plain dataclasses: nothing here (or past the edge modules `convert`,
`worker_client`, `store_client`, `service`) sees a *_pb2 type."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Residency(enum.Enum):
    GPU_SLOT = "gpu_slot"
    HOST_MEMORY = "host_memory"
    LOADING = "loading"


class WorkerState(enum.Enum):
    UNSPECIFIED = "unspecified"
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


class AdapterState(enum.Enum):
    UNSPECIFIED = "unspecified"
    REGISTERED = "registered"
    DOWNLOADING = "downloading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AdapterRef:
    name: str
    # "" in a request: whatever version the worker (or its store) resolves now.
    content_hash: str = ""


@dataclass(frozen=True, slots=True)
class ResidentAdapter:
    ref: AdapterRef
    residency: Residency
    active_requests: int = 0
    rank: int = 0


@dataclass(frozen=True)
class WorkerStatus:
    """What a worker reports about itself (WorkerStatus in common.proto)."""

    worker_id: str
    address: str = ""
    state: WorkerState = WorkerState.UNSPECIFIED
    base_model: str = ""
    device: str = ""
    waiting_requests: int = 0
    running_requests: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_block_size: int = 0
    max_loras: int = 0
    max_cpu_loras: int = 0
    max_lora_rank: int = 0
    adapters: tuple[ResidentAdapter, ...] = ()
    max_model_len: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter the router knows: from the store's manifests, the workers' statuses or LoadAdapter."""

    name: str
    content_hash: str = ""
    source_uri: str = ""
    base_model: str = ""
    rank: int = 0
    state: AdapterState = AdapterState.READY
    created: int = 0  # unix seconds

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.content_hash)


@dataclass(frozen=True)
class Payload:
    """The prompt and sampling parameters of a request. The router forwards them to a worker untouched and
    never looks inside (the worker validates them), so they stay in whatever form the edge received."""

    prompt: object
    sampling: object


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    payload: Payload
    # Seconds left before the client's deadline; None: no deadline.
    timeout: float | None = None
    # The unary Generate: nothing reaches the client before the end, so a worker lost midway is retried too.
    buffered: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Delta:
    """One step of a generation: the text and tokens added since the previous one. Not frozen (built once
    per token on the hot path; a frozen dataclass builds 2x slower), but treated as immutable."""

    text: str = ""
    token_ids: Sequence[int] = ()
    # Passed through to the client as the worker sent them; the router never reads them.
    logprobs: Sequence[object] = ()
    # None until the last delta: "length", "stop", "abort" or "error".
    finish_reason: str | None = None
    stop_reason: str = ""
    usage: Usage | None = None
    # Set on the first delta: which worker, and which adapter version, serves the request.
    worker_id: str = ""
    adapter: AdapterRef | None = None


@dataclass(frozen=True)
class ClusterStatus:
    workers: tuple[WorkerStatus, ...]
    base_model: str


@dataclass(frozen=True)
class ModelEntry:
    """One row of ListModels: the base model (adapter None) or an adapter."""

    id: str
    base_model: str
    adapter: AdapterInfo | None = None
    max_model_len: int = 0


@dataclass(frozen=True)
class LoadRequest:
    name: str
    source_uri: str = ""
    base_model_name: str = ""
    load_inplace: bool = False
    warm_worker_ids: tuple[str, ...] = field(default_factory=tuple)
