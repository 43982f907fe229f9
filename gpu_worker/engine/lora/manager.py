"""LoRAManager: adapters from request to device slot. Reads and checks an adapter once, keeps up to
max_cpu_loras in host memory (LRU, packed in the slot layout, pinned), and copies one into a device slot
when the scheduler grants it one. On CUDA that copy runs on a side stream: the request waits for it while
the other requests keep stepping.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_slots import HostLRU, SlotTable
from ..errors import AdapterError
from ..lora_request import LoRARequest
from ..model.config import ModelConfig
from .peft_adapter import CONFIG_FILE, WEIGHTS_FILE, content_hash, load_adapter, missing_weights
from .slot_buffers import SlotBuffers

# On CUDA, cold copies the scheduler starts are issued after the step it schedules has been launched
# (`issue_loads`), not at once. Issued at once, a copy waits for the step in flight and becomes ready together
# with the next step's own input copy, which it is ahead of: if the copy engine keeps that order, the step waits for
# the whole image (about a rank-16 1B adapter's 22.5 MB over PCIe). Issued after the launch, the step's inputs are
# ahead of it, and the copy runs during the step (an adapter comes in one step later). H200, batch 32 over 8
# resident adapters, 8 cold loads, two alternating rounds each (`python3 -m benchmarks.worker --cold-only`): decode
# steps during the copies 1.10x and 1.10x the median before (mean; max 1.35x, 1.27x), against 1.16x and 1.32x
# (max 1.40x, 1.42x) issued at once. The worst step is not the copy engine's order: the image cut into 8 copies
# left it where it was (1.40x and 1.37x against 1.36x and 1.32x whole, means 1.00-1.04x).
# The image's copy into the device staging buffer goes out at once, and only its scatter into the slot waits for
# the steps in flight (what may read the slot's old adapter): waiting first, the copy became ready when the step in
# flight ended, beside the next step's input copy. H200, batch 32 over 8 resident adapters, 8 cold loads, rounds
# alternating (`python3 -m benchmarks.worker --cold-only`): mean step during the copies 0.97x / 0.98x of before
# (max 1.17x / 1.20x), against 1.05x / 1.04x (max 1.41x / 1.33x) waiting first; the step a cold request's prefill
# joins 3.70 / 3.42 ms against 4.29 / 3.90.

AdapterKey = tuple[str, str]  # (name, content_hash)


@dataclass
class HostAdapter:
    image: torch.Tensor  # one slot row, packed (SlotBuffers.pack)
    max_rank: int
    groups: frozenset[str]  # the fused groups it targets


@dataclass
class Residency:
    key: AdapterKey
    where: str  # "gpu_slot" or "host_memory"
    in_use: int
    rank: int


class LoRAManager:
    def __init__(
        self,
        cfg: ModelConfig,
        served_model_name: str,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        max_adapter_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.cfg = cfg
        self.served_model_name = served_model_name
        self.max_lora_rank = max_lora_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.device = device
        self.dtype = dtype
        self.slots = SlotTable(max_loras)
        self.host: HostLRU[HostAdapter] = HostLRU(max_cpu_loras)
        self.buffers = SlotBuffers(cfg, max_loras, max_lora_rank, device, dtype)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Adapters read and packed off the engine thread (stage), waiting for resolve() to take them.
        self._staged: OrderedDict[AdapterKey, HostAdapter] = OrderedDict()
        self._staged_lock = threading.Lock()
        self._loading: dict[AdapterKey, torch.cuda.Event] = {}
        self._queued: dict[AdapterKey, tuple[int, HostAdapter]] = {}  # started, issued after the launch
        # Recorded on the step's stream after the last relayout, which uses the device staging buffer that uploads
        # write (an upload waits for it, not for the steps).
        self._relaid: torch.cuda.Event | None = None
        self._ranks: dict[AdapterKey, int] = {}
        # (path, size, mtime) -> content hash: hashing reads every byte, so do it once per file version.
        self._hashes: dict[tuple[str, int, int], str] = {}

    def resolve(self, request: LoRARequest) -> AdapterKey:
        """The adapter's key; reads, checks and caches it in host memory if it is not there yet."""
        self._check_base(request)
        root = Path(request.lora_path)
        digest = self._content_hash(root, request.lora_name)
        key = (request.lora_name, digest)
        if self.host.get(key) is None:
            with self._staged_lock:
                entry = self._staged.pop(key, None)
            entry = entry or self._read(key, root)
            self.host.put(key, entry)
            self._ranks[key] = entry.max_rank
        return key

    def _check_base(self, request: LoRARequest) -> None:
        if request.base_model_name and request.base_model_name != self.served_model_name:
            raise AdapterError("mismatch", f"adapter {request.lora_name!r} is for base model "
                               f"{request.base_model_name!r}; this worker serves {self.served_model_name!r}")

    def stage(self, request: LoRARequest) -> bool:
        """Read, check and pack an adapter ahead of resolve(), from any thread: the disk read and the
        packing (~100 ms for 22 MB) then never stall the engine's step loop. Raises what resolve() would.
        True when it read the adapter; False when it was already in host memory or staged."""
        self._check_base(request)
        root = Path(request.lora_path)
        key = (request.lora_name, self._content_hash(root, request.lora_name))
        if key in self.host or key in self._staged:
            return False
        entry = self._read(key, root)
        with self._staged_lock:
            self._staged[key] = entry
            while len(self._staged) > self.host.capacity:  # staged but never resolved: drop the oldest
                self._staged.popitem(last=False)
        return True

    def is_staged(self, request: LoRARequest) -> bool:
        """Whether stage() would do nothing: the adapter's current files are hashed already and it is in host
        memory or staged. Cheap (two stats, no read), for the event loop to skip a thread hop."""
        try:
            digest = self._hashes.get(self._stamp(Path(request.lora_path)))
        except OSError:
            return False
        key = (request.lora_name, digest)
        return digest is not None and (key in self.host or key in self._staged)

    def pin(self, key: AdapterKey) -> None:
        """Keep the adapter in host memory while a request for it is unfinished."""
        self.host.pin(key)

    def unpin(self, key: AdapterKey) -> None:
        self.host.unpin(key)

    def _content_hash(self, root: Path, name: str) -> str:
        try:
            stamp = self._stamp(root)
        except OSError:
            if not root.is_dir():
                raise AdapterError("not_found", f"adapter {name!r}: {root} is not a directory") from None
            raise missing_weights(root, name) from None
        if stamp not in self._hashes:
            try:
                self._hashes[stamp] = content_hash(root)
            except OSError as e:
                raise AdapterError("not_found", f"adapter {name!r}: {e}") from None
        return self._hashes[stamp]

    @staticmethod
    def _stamp(root: Path) -> tuple:
        """(path, (size, mtime) of each file): a file version. Both files: the content hash covers the config
        too (alpha lives there). Raises OSError when one is missing."""
        stats = [os.stat(root / f) for f in (WEIGHTS_FILE, CONFIG_FILE)]
        return (str(root.resolve()), *((st.st_size, st.st_mtime_ns) for st in stats))

    def _read(self, key: AdapterKey, root: Path) -> HostAdapter:
        weights = load_adapter(root, key[0], self.cfg, self.max_lora_rank, self.dtype, self.max_adapter_bytes, key[1])
        return HostAdapter(self.buffers.pack(weights, pin=self.device.type == "cuda"), weights.max_rank,
                           self.buffers.groups_of(weights))

    def start_load(self, slot: int, key: AdapterKey) -> bool:
        """Copy the adapter into `slot`. True when it is usable now; False while the copy is in flight on
        the side stream (see `ready`)."""
        entry = self.host.get(key)
        if entry is None:
            raise RuntimeError(f"adapter {key[0]} ({key[1][:12]}) is scheduled but not in host memory (unpinned?)")
        self._fit_layout()
        if self._stream is None:
            self.buffers.load(slot, entry.image, entry.max_rank, entry.groups)
            return True
        self._queued[key] = (slot, entry)
        return False

    def issue_loads(self) -> None:
        """Issue the copies started since the last call: the engine calls it once it has launched
        the step it scheduled. The copies go at the slots' stride as it is now."""
        if not self._queued:  # (every step calls it)
            return
        queued, self._queued = self._queued, {}
        for key, (slot, entry) in queued.items():
            self._issue(slot, key, entry)

    def _issue(self, slot: int, key: AdapterKey, entry: HostAdapter) -> None:
        # The slot's previous adapter may still be read by the step in flight: write the slot after it.
        main = torch.cuda.current_stream(self.device)
        wait = functools.partial(self._stream.wait_stream, main)
        if self._relaid is not None:  # (the staging buffer the upload writes)
            self._stream.wait_event(self._relaid)
        with torch.cuda.stream(self._stream):
            self.buffers.load(slot, entry.image, entry.max_rank, entry.groups,
                              before_scatter=wait)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._loading[key] = event

    def in_host(self, key: AdapterKey) -> bool:
        return key in self.host

    @property
    def copies_in_flight(self) -> int:
        return len(self._loading) + len(self._queued)

    def ready(self, key: AdapterKey) -> bool:
        """Whether the adapter's copy into its slot has finished (polled, never waited on)."""
        if key in self._queued:
            return False
        event = self._loading.get(key)
        if event is None:
            return True
        if event.query():
            del self._loading[key]
            return True
        return False

    def evict(self, name: str, content_hash: str | None = None) -> int:
        """Drop matching adapters that no request uses from slots and host memory. Returns how many."""
        keys = {k for k in [*self.host.keys(), *self.slots.resident()] if k[0] == name}  # noqa: SIM118
        evicted = 0
        for key in keys:
            if content_hash and key[1] != content_hash:
                continue
            if self.slots.in_use(key):
                continue
            dropped = self.slots.evict(key)
            dropped = self.host.pop(key) is not None or dropped
            evicted += dropped
        if evicted:
            self._fit_layout()
        return evicted

    def _fit_layout(self) -> None:
        """Lay the slots out at the least rank stride that holds every adapter they hold or are being copied
        into (SlotBuffers' rank classes): larger when one of a larger rank comes in, smaller when the last one
        leaves. The move waits for the copies in flight and runs before the next step, on the step's stream."""
        occupied = self.slots.occupied()
        want = self.buffers.class_for(max((self._ranks.get(k, 0) for k in occupied.values()), default=0))
        if want == self.buffers.rank_class:
            return
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self.buffers.relayout(want, occupied)
        if self._stream is not None:
            self._relaid = torch.cuda.Event()
            self._relaid.record(torch.cuda.current_stream(self.device))

    def residency(self) -> list[Residency]:
        out = []
        in_slots = self.slots.resident()
        for key in in_slots:
            out.append(Residency(key, "gpu_slot", self.slots.in_use(key), self._ranks.get(key, 0)))
        for key in self.host.keys():  # noqa: SIM118 (LRU order, not a dict)
            if key not in in_slots:
                out.append(Residency(key, "host_memory", 0, self._ranks.get(key, 0)))
        return out
