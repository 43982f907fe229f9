"""A decode step's inputs into its CUDA graph's static buffers, in one launch.

Each decode step copies its inputs to the device in one piece (pinned, asynchronous) and then into the buffers the
graph reads: token ids, positions, KV slots, context lengths, LoRA slots, block tables, and for tokens the step in
flight samples, their ids from that step's output on the device. As torch ops that was seven copies and an
index_select / index_copy pair a step: ~9 launches and ~80 us of the engine thread's time. Here one program per
row does all of it.

The staged array (int64), for a step of b rows (the graph's bucket) and block tables `width` wide:

    [ids b | positions b | KV slots b | context lengths b | LoRA slots b | patch b | width | tables b x width]

where patch[row] is the row of `pending` (the step in flight's sampled ids) whose id replaces ids[row], or -1.

    decode_inputs(staged, pending, ids, positions, kv_slots, context_lens, lora_slots, tables, b, has_lora)
    decode_inputs_ref(...)   # the same in torch ops (the CPU's way); pending None: no row takes an id
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launches

BLOCK = 128  # block-table entries a loop iteration moves


@triton.jit
def _decode_inputs_kernel(src_ptr, pending_ptr, ids_ptr, pos_ptr, kv_slot_ptr, ctx_ptr, lora_ptr, table_ptr,
                          table_stride, HAS_LORA: tl.constexpr, HAS_PATCH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = tl.num_programs(0)
    tok = tl.load(src_ptr + row)
    if HAS_PATCH:
        p = tl.load(src_ptr + 5 * b + row)
        tok = tl.where(p >= 0, tl.load(pending_ptr + tl.maximum(p, 0)), tok)
    tl.store(ids_ptr + row, tok)
    tl.store(pos_ptr + row, tl.load(src_ptr + b + row))
    tl.store(kv_slot_ptr + row, tl.load(src_ptr + 2 * b + row))
    tl.store(ctx_ptr + row, tl.load(src_ptr + 3 * b + row).to(tl.int32))
    if HAS_LORA:
        tl.store(lora_ptr + row, tl.load(src_ptr + 4 * b + row).to(tl.int32))
    width = tl.load(src_ptr + 6 * b)
    entries = src_ptr + 6 * b + 1 + row * width
    for c in range(0, width, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        ok = cols < width
        tl.store(table_ptr + row * table_stride + cols, tl.load(entries + cols, mask=ok).to(tl.int32), mask=ok)


_launch = Launches(_decode_inputs_kernel)


def staged_size(b: int, width: int) -> int:
    """int64 values the staged array of a step holds."""
    return 6 * b + 1 + b * width


def _check(ids: torch.Tensor, tables: torch.Tensor, b: int) -> None:
    if tables.dim() != 2 or tables.stride(1) != 1 or ids.shape[0] < b or tables.shape[0] < b:
        raise ValueError(f"need static buffers of at least {b} rows and a row-major block table")


def decode_inputs(staged: torch.Tensor, pending: torch.Tensor | None, ids: torch.Tensor, positions: torch.Tensor,
                  kv_slots: torch.Tensor, context_lens: torch.Tensor, lora_slots: torch.Tensor, tables: torch.Tensor,
                  b: int, has_lora: bool) -> None:
    """Rows [0, b) of the static buffers <- the staged array (the module doc's layout), on the device: ids,
    positions and KV slots int64; context lengths, LoRA slots (has_lora) and the tables int32. pending: the ids the
    step in flight samples (None: no row takes one)."""
    _check(ids, tables, b)
    _launch((b,), staged, pending if pending is not None else ids, ids, positions, kv_slots, context_lens,
            lora_slots, tables, tables.stride(0), HAS_LORA=has_lora, HAS_PATCH=pending is not None, BLOCK=BLOCK,
            num_warps=1)


def decode_inputs_ref(staged: torch.Tensor, pending: torch.Tensor | None, ids: torch.Tensor, positions: torch.Tensor,
                      kv_slots: torch.Tensor, context_lens: torch.Tensor, lora_slots: torch.Tensor,
                      tables: torch.Tensor, b: int, has_lora: bool) -> None:
    """decode_inputs in torch ops (reading the tables' width from the array waits for a device: the CPU's way)."""
    _check(ids, tables, b)
    width = int(staged[6 * b])
    cols = staged[: 6 * b].view(6, b)
    ids[:b] = cols[0]
    positions[:b] = cols[1]
    kv_slots[:b] = cols[2]
    context_lens[:b] = cols[3]
    if has_lora:
        lora_slots[:b] = cols[4]
    tables[:b, :width] = staged[6 * b + 1 : staged_size(b, width)].view(b, width)
    if pending is not None:
        patch = cols[5]
        rows = (patch >= 0).nonzero().squeeze(1)
        ids.index_copy_(0, rows, pending.index_select(0, patch.index_select(0, rows)))
